/* Minimal CRT <io.h>: the one function the WHP backend uses. On Windows it returns the OS
 * HANDLE behind a CRT file descriptor; the Linux shim returns the descriptor itself, which
 * CreateFileMappingW and GetFileSizeEx accept as a handle. Like on Windows, the descriptor
 * stays owned by the CRT (Python): do not CloseHandle() it. */
#ifndef WHV_COMPAT_IO_H
#define WHV_COMPAT_IO_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
intptr_t _get_osfhandle(int fd);
#ifdef __cplusplus
}
#endif
#endif
