// The one helper Swift cannot reach through Glibc: dladdr needs _GNU_SOURCE.
#define _GNU_SOURCE
#include <dlfcn.h>
#include "CCUDA.h"

const char *flashmoe_library_path_of_symbol(const void *symbol) {
    Dl_info info;
    if (dladdr(symbol, &info) != 0 && info.dli_fname != NULL) return info.dli_fname;
    return NULL;
}
