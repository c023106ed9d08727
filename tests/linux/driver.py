# A warm Python worker: imports what it is told on the command line, then executes one line of
# stdin at a time, flushing after each. Run inside LinuxSandbox; snapshot it while it waits.
import sys

for name in sys.argv[1:]:
    globals()[name] = __import__(name)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    exec(line)
    sys.stdout.flush()
