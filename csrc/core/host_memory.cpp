#include "host_memory.h"

#include <unistd.h>

#include <cstdio>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace tpext::core {

std::size_t resident_set_bytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long total_pages = 0, resident_pages = 0;
  const int got = std::fscanf(f, "%lu %lu", &total_pages, &resident_pages);
  std::fclose(f);
  if (got != 2) return 0;
  return static_cast<std::size_t>(resident_pages) * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

std::size_t release_freed_host_memory() {
#if defined(__GLIBC__)
  const std::size_t before = resident_set_bytes();
  (void)malloc_trim(0);  // since glibc 2.8 this also returns whole free pages inside every arena
  const std::size_t after = resident_set_bytes();
  return before > after ? before - after : 0;
#else
  return 0;
#endif
}

}  // namespace tpext::core
