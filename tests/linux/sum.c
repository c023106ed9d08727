#include <stdio.h>
#include <string.h>
#include <stdlib.h>
int main(void) {
    char line[256]; long total = 0;
    while (fgets(line, sizeof line, stdin)) {
        total += atol(line);
        printf("sum %ld\n", total); fflush(stdout);
    }
    printf("bye %ld\n", total);
    return 0;
}
