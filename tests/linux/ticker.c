/* Prints a line, then parks reading stdin; each input line: another print and park. Exits 0 at
 * the end of input, 3 when a write fails. (test_reentrancy.py, test_snapshot_trust.py) */
#include <unistd.h>

int main(void) {
    char buf[256];
    for (;;) {
        if (write(1, "tick\n", 5) != 5) return 3;
        if (read(0, buf, sizeof buf) <= 0) return 0;
    }
}
