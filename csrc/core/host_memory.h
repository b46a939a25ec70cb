// Hands the heap memory this process has freed back to the operating system.
//
// NCCL allocates and frees on the order of 100 MB of host memory per communicator it creates and
// destroys (split communicators included). glibc's malloc keeps freed pages in its arenas, so after
// a destroy the process's RSS stays where the peak was and, with the arenas fragmented, creeps up
// from one init/destroy cycle to the next. A probe on one H100 (NCCL 2.28.9, six communicators a
// cycle) saw RSS climb 530 -> 903 MB over ten cycles and drop back to 507 MB at malloc_trim(0):
// freed memory held by the allocator, not a leak. tpext.destroy() calls this once everything is
// released.
#pragma once

#include <cstddef>

namespace tpext::core {

// Returns the RSS (bytes) the call released, 0 where it could not tell or did nothing; a no-op
// where the C library is not glibc.
std::size_t release_freed_host_memory();

// This process's resident set size in bytes, read from /proc/self/statm (0 where unavailable).
std::size_t resident_set_bytes();

}  // namespace tpext::core
