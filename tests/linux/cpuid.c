/* Prints what the cpuid instruction answers this program, one "leaf subleaf eax ebx ecx edx" line
 * per leaf whpfast/cpu.py records: tests/test_cpu.py compares it with the host's record. */
#include <cpuid.h>
#include <stdio.h>

int main(void) {
    static const unsigned leaves[][2] = {{0, 0}, {1, 0}, {7, 0}, {7, 1}, {0xd, 0}, {0xd, 1},
                                         {0x80000000, 0}, {0x80000001, 0}};
    for (unsigned i = 0; i < sizeof leaves / sizeof leaves[0]; i++) {
        unsigned a, b, c, d;
        __cpuid_count(leaves[i][0], leaves[i][1], a, b, c, d);
        printf("%u %u %u %u %u %u\n", leaves[i][0], leaves[i][1], a, b, c, d);
    }
    return 0;
}
