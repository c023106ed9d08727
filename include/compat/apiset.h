/* Stub: winhvplatform.h includes <apiset.h>; nothing is needed from it on Linux. */
#include <windows.h>
