/*
 * Whether this library can run on this machine, asked once when the binding loads it: a library
 * that dlopens fine can still be unusable (no device, a driver older than the CUDA runtime it was
 * built with, no kernel image or PTX for the device's architecture), and the caller should then
 * take the PyTorch reference with one warning instead of failing inside the first kernel.
 */
#include <stdio.h>

#include "cuda_common.cuh"

/* Stands for every kernel of the library: all are built for the same architecture list. */
__global__ void dipp_device_check_kernel(int *out) {
    if (out) *out = 0;
}

/* 0 when a kernel can be launched on the current device; else a CUDA error code, with `why` in words. */
extern "C" int dipp_cuda_device_check(char *why, size_t why_size) {
    int driver = 0, runtime = 0, devices = 0;
    cudaError_t err = cudaRuntimeGetVersion(&runtime);
    if (err == cudaSuccess) err = cudaDriverGetVersion(&driver);
    if (err == cudaSuccess && driver == 0) { /* CUDA reports version 0 when no driver is installed */
        snprintf(why, why_size, "no NVIDIA driver is installed, so no usable CUDA device");
        return (int)cudaErrorInsufficientDriver;
    }
    if (err == cudaSuccess && driver < runtime) err = cudaErrorInsufficientDriver;
    if (err == cudaErrorInsufficientDriver) {
        snprintf(why, why_size, "the NVIDIA driver supports CUDA %d.%d but the library was built with CUDA %d.%d "
                 "(update the driver)", driver / 1000, driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
        return (int)err;
    }
    if (err == cudaSuccess) err = cudaGetDeviceCount(&devices);
    if (err == cudaSuccess && devices == 0) err = cudaErrorNoDevice;
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(why, why_size, "no usable CUDA device (%s)", cudaGetErrorString(err));
        return (int)err;
    }
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, dipp_device_check_kernel);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(why, why_size, "the library has no kernel image for this GPU (%s); rebuild with its architecture "
                 "in DIPP_CUDA_ARCHS", cudaGetErrorString(err));
        return (int)err;
    }
    if (why_size) why[0] = '\0';
    return 0;
}
