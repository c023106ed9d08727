/* A tiny command loop for tests/test_linux_tmp_mounts.py: one command per line of stdin, one or
   more lines of output each ("<command> <path>: <result>"), parked in a read of stdin between
   them (so a test can snapshot, restore and ask again). Commands: cat, ls, cd, pwd, write,
   mkdir, rmdir, unlink, rmrf (rm -rf: every failure on its own line), mv A B. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int rmrf(const char *path) {
    struct stat st;
    int failures = 0;
    if (lstat(path, &st) != 0) {
        printf("rmrf %s: %s\n", path, strerror(errno));
        return 1;
    }
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        if (d == NULL) {
            printf("rmrf %s: %s\n", path, strerror(errno));
            return 1;
        }
        while ((e = readdir(d)) != NULL) {
            char child[4096];
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            snprintf(child, sizeof child, "%s/%s", path, e->d_name);
            failures += rmrf(child);
        }
        closedir(d);
        if (rmdir(path) != 0) {
            printf("rmrf %s: %s\n", path, strerror(errno));
            failures++;
        }
    } else if (unlink(path) != 0) {
        printf("rmrf %s: %s\n", path, strerror(errno));
        failures++;
    }
    return failures;
}

static void result(const char *cmd, const char *path, int rc) {
    printf("%s %s: %s\n", cmd, path, rc == 0 ? "ok" : strerror(errno));
}

int main(void) {
    char line[8192];
    setvbuf(stdout, NULL, _IONBF, 0);
    while (fgets(line, sizeof line, stdin) != NULL) {
        char *cmd = strtok(line, " \n"), *path = strtok(NULL, " \n"), *other = strtok(NULL, " \n");
        if (cmd == NULL)
            continue;
        if (path == NULL)
            path = ".";
        if (!strcmp(cmd, "cat")) {
            char buf[4096];
            ssize_t n;
            int fd = open(path, O_RDONLY);
            if (fd < 0) {
                result(cmd, path, -1);
                continue;
            }
            while ((n = read(fd, buf, sizeof buf)) > 0)
                fwrite(buf, 1, n, stdout);
            close(fd);
        } else if (!strcmp(cmd, "ls")) {
            DIR *d = opendir(path);
            struct dirent *e;
            if (d == NULL) {
                result(cmd, path, -1);
                continue;
            }
            printf("ls %s:", path);
            while ((e = readdir(d)) != NULL)
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                    printf(" %s", e->d_name);
            printf("\n");
            closedir(d);
        } else if (!strcmp(cmd, "cd")) {
            result(cmd, path, chdir(path));
        } else if (!strcmp(cmd, "pwd")) {
            char cwd[4096];
            printf("pwd: %s\n", getcwd(cwd, sizeof cwd) ? cwd : strerror(errno));
        } else if (!strcmp(cmd, "write")) {
            int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0)
                close(fd);
            result(cmd, path, fd < 0 ? -1 : 0);
        } else if (!strcmp(cmd, "mkdir")) {
            result(cmd, path, mkdir(path, 0755));
        } else if (!strcmp(cmd, "rmdir")) {
            result(cmd, path, rmdir(path));
        } else if (!strcmp(cmd, "unlink")) {
            result(cmd, path, unlink(path));
        } else if (!strcmp(cmd, "mv")) {
            result(cmd, path, rename(path, other ? other : ""));
        } else if (!strcmp(cmd, "rmrf")) {
            printf("rmrf %s: %d failed\n", path, rmrf(path));
        } else {
            printf("%s: unknown command\n", cmd);
        }
    }
    return 0;
}
