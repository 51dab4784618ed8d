// An XLA FFI custom call for the CPU that returns its output buffer uninitialized, after asking
// the kernel to back it with transparent huge pages (madvise MADV_HUGEPAGE). A fresh 235 MB output
// otherwise costs 57,345 first-touch page faults (~42 ms of wall time on 2 cores); with huge pages,
// 624. jaxquant's CPU dequantize then writes into this buffer (donated), see cpu_pages.py.
#include <sys/mman.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error HugePageBuffer(ffi::Result<ffi::AnyBuffer> out) {
  const uintptr_t page = 4096;
  const uintptr_t data = reinterpret_cast<uintptr_t>(out->untyped_data());
  const uintptr_t start = (data + page - 1) & ~(page - 1);
  const uintptr_t end = (data + out->size_bytes()) & ~(page - 1);
  // Advice only: where the kernel cannot (THP off, no memory), the pages stay small.
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantHugePageBuffer, HugePageBuffer,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
