/* Stub: winhvplatform.h includes <apisetcconv.h>; nothing is needed from it on Linux. */
#include <windows.h>
