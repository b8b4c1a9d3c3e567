// C entry points for AOTInductor: a compiled step calls our ops through these directly
// (`aot_inductor.custom_ops_to_c_shims`, see models/compiled.py) instead of through its proxy
// executor, which boxes every argument (~20 us a call, 151 calls a step on the embedded target).
// The names and argument order are the ones AOTInductor generates: aoti_torch_cpu_<op>(inputs..., outputs).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

namespace {

at::Tensor& tensor(AtenTensorHandle handle) { return *torch::aot_inductor::tensor_handle_to_tensor_pointer(handle); }

}  // namespace

namespace saguaro_cpu {
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n);
at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n);
at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n);
at::Tensor q4_1_i8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n);
at::Tensor q8_0_i8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n);
at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t layer, const at::Tensor& slots, const at::Tensor& mask);
}  // namespace saguaro_cpu

// aoti_torch_cpu_<op>(x, packed, n, out) for each linear op of ours: one shape, one definition.
#define SAGUARO_LINEAR_SHIM(op)                                                                                \
  AOTITorchError aoti_torch_cpu_##op(AtenTensorHandle x, AtenTensorHandle packed, int64_t n,                  \
                                     AtenTensorHandle* out) {                                                 \
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(                                                                \
        { *out = torch::aot_inductor::new_tensor_handle(saguaro_cpu::op(tensor(x), tensor(packed), n)); });    \
  }

extern "C" {

SAGUARO_LINEAR_SHIM(packed_linear)
SAGUARO_LINEAR_SHIM(q4_1_linear)
SAGUARO_LINEAR_SHIM(q8_0_linear)
SAGUARO_LINEAR_SHIM(q4_1_i8_linear)
SAGUARO_LINEAR_SHIM(q8_0_i8_linear)

AOTITorchError aoti_torch_cpu_cached_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                               AtenTensorHandle k_cache, AtenTensorHandle v_cache, int64_t layer,
                                               AtenTensorHandle slots, AtenTensorHandle mask, AtenTensorHandle* out) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *out = torch::aot_inductor::new_tensor_handle(saguaro_cpu::cached_attention(
        tensor(q), tensor(k), tensor(v), tensor(k_cache), tensor(v_cache), layer, tensor(slots), tensor(mask)));
  });
}

}  // extern "C"
