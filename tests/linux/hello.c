#include <stdio.h>
int main(int argc, char **argv) {
    printf("hello from %d args:", argc);
    for (int i = 0; i < argc; i++) printf(" [%s]", argv[i]);
    printf("\n");
    fprintf(stderr, "to stderr\n");
    return 3;
}
