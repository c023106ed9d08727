/* Stub <winapifamily.h>: every API partition counts as desktop. */
#ifndef WHV_COMPAT_WINAPIFAMILY_H
#define WHV_COMPAT_WINAPIFAMILY_H
#include <windows.h>
#define WINAPI_PARTITION_DESKTOP 1
#define WINAPI_PARTITION_APP 1
#define WINAPI_PARTITION_PC_APP 1
#define WINAPI_PARTITION_PHONE_APP 1
#define WINAPI_PARTITION_SYSTEM 1
#define WINAPI_PARTITION_GAMES 1
#define WINAPI_FAMILY_PARTITION(x) (x)
#endif

/* mingw's winhvplatform.h includes this header immediately before <winhvplatformdefs.h>.
 * WCHAR is wchar_t here (4 bytes on Linux), but the one WHV struct that uses it,
 * WHV_SRIOV_RESOURCE_DESCRIPTOR, is laid out with Windows' 2-byte WCHAR and checks its size
 * (C_ASSERT == 412). So the WHV definitions are pulled in right here with WCHAR spelled as a
 * 16-bit type, which gives exactly the Windows layout; the macro is dropped again at once, so
 * code that includes <winhvplatform.h> still sees WCHAR == wchar_t. (Include
 * <winhvplatform.h>, not <winhvplatformdefs.h> on its own.) */
#if defined(_WINHVAPI_H_) && !defined(_WINHVAPIDEFS_H_)
#define WCHAR UINT16
#include <winhvplatformdefs.h>
#undef WCHAR
#endif
