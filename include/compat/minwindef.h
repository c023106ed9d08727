/* Stub: winhvplatform.h includes <minwindef.h>; the base types live in our <windows.h>. */
#include <windows.h>
