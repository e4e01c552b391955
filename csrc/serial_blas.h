// serial_blas.h: small CPU products run on the calling thread alone.
//
// torch turns MKL's dynamic threading off (so that its OpenMP team is not
// rebuilt between MKL and other parallel regions), so MKL forks its whole
// team even for a 5 x 128 x 128 product. At that size the fork and join cost
// more than the product, and more still when the team has gone to sleep
// between the products of a training step, as it does while the autograd
// engine and Python run. Measured on 2 cores: a 64 -> 128 -> 10 training step
// at batch 5 ran 5-25% faster (most where the solves take the most
// iterations) with its products on one thread; products from about 2^18
// multiply-adds up gain from the team (benchmarks/README.md).
//
// MKL's per-thread setting is used, so solves running at the same time on
// other threads keep theirs. Without MKL (ATen on another BLAS) this does
// nothing.
#ifndef IDL_SERIAL_BLAS_H
#define IDL_SERIAL_BLAS_H

#include <ATen/Config.h>
#include <c10/core/Device.h>

#include <cstdint>

// mkl_service.h's C interface (mkl_set_num_threads_local is a macro for it
// there; the exported lowercase symbol is the Fortran one, taking a pointer).
// MKL's headers do not ship with torch; libtorch_cpu exports the symbol. It is
// declared weak, so that a torch that does not export it loads the extension
// all the same (the pointer is then null, and MKL keeps its threads).
#if AT_MKL_ENABLED() && defined(__GNUC__)
#define IDL_SERIAL_BLAS 1
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));
#else
#define IDL_SERIAL_BLAS 0
#endif

namespace idl_glue {

// Fewer multiply-adds than this in the largest product: run on one thread.
constexpr int64_t kSerialBlasMaxWork = int64_t{1} << 18;

// For its lifetime, MKL runs on the calling thread alone when the work is on
// the CPU and its largest product has fewer than kSerialBlasMaxWork
// multiply-adds.
class SerialBlasIfSmall {
   public:
    SerialBlasIfSmall(const c10::Device& device, int64_t largest_product) {
#if IDL_SERIAL_BLAS
        engaged_ = MKL_Set_Num_Threads_Local != nullptr && device.is_cpu() &&
                   largest_product < kSerialBlasMaxWork;
        if (engaged_) previous_ = MKL_Set_Num_Threads_Local(1);
#else
        (void)device;
        (void)largest_product;
#endif
    }
    ~SerialBlasIfSmall() {
#if IDL_SERIAL_BLAS
        // 0, when nothing was set for this thread before, means "MKL's global
        // setting" again.
        if (engaged_) MKL_Set_Num_Threads_Local(previous_);
#endif
    }
    SerialBlasIfSmall(const SerialBlasIfSmall&) = delete;
    SerialBlasIfSmall& operator=(const SerialBlasIfSmall&) = delete;

   private:
    bool engaged_ = false;
    int previous_ = 0;
};

}  // namespace idl_glue

#endif  // IDL_SERIAL_BLAS_H
