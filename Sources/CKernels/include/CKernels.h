#pragma once
#include <stddef.h>

/// Returns the embedded text of kernel file `name` (for example "moe.cuh") and its length, or NULL if no file of
/// that name was embedded.
const char *flashmoe_kernel_source(const char *name, size_t *length);

/// The number of embedded kernel files, and the name of file i (for listing and cache keys).
size_t flashmoe_kernel_file_count(void);
const char *flashmoe_kernel_file_name(size_t i);
