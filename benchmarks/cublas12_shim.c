/* libcublas.so.12 for a machine that has CUDA 13's cuBLAS only (benchmarks/gpu_check.sh builds it there):
 * faiss-gpu-cu12 needs CUDA 12's cuBLAS, a 554 MiB download, for the eight calls below, whose C signatures are
 * the same in cuBLAS 13. Each is a jump to cuBLAS 13's function, resolved when the library loads (CUBLAS13_PATH
 * names the file; default: libcublas.so.13 on the loader's path). Symbols carry the version node
 * libcublas.so.12, as faiss's library asks for them. Not for other programs: it exports only these eight. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#define FUNCTIONS(X) X(cublasCreate_v2) X(cublasDestroy_v2) X(cublasGemmEx) X(cublasGemmStridedBatchedEx) \
    X(cublasGetMathMode) X(cublasSetMathMode) X(cublasSetStream_v2) X(cublasSgemmEx)

#define TRAMPOLINE(name) \
    __attribute__((visibility("hidden"))) void *real_##name; \
    __asm__(".globl " #name "\n.type " #name ",@function\n" #name ":\n\tjmp *real_" #name "(%rip)\n");
FUNCTIONS(TRAMPOLINE)

__attribute__((constructor)) static void forward_to_cublas13(void) {
    const char *path = getenv("CUBLAS13_PATH");
    void *cublas = dlopen(path ? path : "libcublas.so.13", RTLD_NOW | RTLD_GLOBAL);
    if (!cublas) { fprintf(stderr, "cublas12 shim: %s\n", dlerror()); abort(); }
#define RESOLVE(name) \
    if (!(real_##name = dlsym(cublas, #name))) { fprintf(stderr, "cublas12 shim: no %s\n", #name); abort(); }
    FUNCTIONS(RESOLVE)
}
