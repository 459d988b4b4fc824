// y = x @ w with float32 activations and bfloat16 weights, accumulated in float32, for XLA:CPU.
//
// XLA:CPU has no bfloat16 dot: given a bfloat16 kernel it converts the whole kernel to float32
// and reads that copy. This handler reads the weights as stored (2 bytes each), widening every
// row to float32 on the fly (a bfloat16 is the upper half of a float32: bits << 16, exact).
//
// Operands (row-major, shapes checked here, errors returned as FFI InvalidArgument):
//   x: (..., B, K) float32
//   w: (..., K, N) bfloat16, the same leading dims as x (none in the usual call; vmap with
//      vmap_method="broadcast_all" adds them to both)
//   y: (..., B, N) float32, y[g, b, n] = sum_k x[g, b, k] * float(w[g, k, n])
//
// Loop order: for each k, row k of w is widened once and added, scaled by x[b, k], into every
// y[b, :]: each weight is read once per call whatever B. Products are accumulated in float32,
// k in increasing order. The inner loops are plain unit-stride loops over n with restrict
// pointers, which GCC vectorises at -O3 (-march=native picks the vector width).
//
// Built and registered by bf16_matmul.py; the exported symbol is LcsmBf16Matmul.

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float WidenBf16(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// y (B, N) = x (B, K) @ w (K, N) for one group; `row` is scratch of N floats (used when B > 1).
void MatmulGroup(const float* __restrict x, const uint16_t* __restrict w, float* __restrict y,
                 int64_t batch, int64_t depth, int64_t width, float* __restrict row) {
  for (int64_t i = 0; i < batch * width; ++i) y[i] = 0.0f;
  if (batch == 1) {
    // One row of activations: widen and accumulate in one pass over the weight rows, four
    // rows at a time so that y[n] is loaded and stored once per four rows (the additions
    // stay in increasing k order).
    int64_t k = 0;
    for (; k + 4 <= depth; k += 4) {
      const float x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
      const uint16_t* __restrict w0 = w + k * width;
      const uint16_t* __restrict w1 = w0 + width;
      const uint16_t* __restrict w2 = w1 + width;
      const uint16_t* __restrict w3 = w2 + width;
      for (int64_t n = 0; n < width; ++n) {
        float acc = y[n];
        acc += x0 * WidenBf16(w0[n]);
        acc += x1 * WidenBf16(w1[n]);
        acc += x2 * WidenBf16(w2[n]);
        acc += x3 * WidenBf16(w3[n]);
        y[n] = acc;
      }
    }
    for (; k < depth; ++k) {
      const float xk = x[k];
      const uint16_t* __restrict wk = w + k * width;
      for (int64_t n = 0; n < width; ++n) y[n] += xk * WidenBf16(wk[n]);
    }
    return;
  }
  for (int64_t k = 0; k < depth; ++k) {
    const uint16_t* __restrict wk = w + k * width;
    for (int64_t n = 0; n < width; ++n) row[n] = WidenBf16(wk[n]);
    for (int64_t b = 0; b < batch; ++b) {
      const float xbk = x[b * depth + k];
      float* __restrict yb = y + b * width;
      for (int64_t n = 0; n < width; ++n) yb[n] += xbk * row[n];
    }
  }
}

std::string ShapeText(ffi::AnyBuffer::Dimensions dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(dims[i]);
  }
  return text + (dims.size() == 1 ? ",)" : ")");
}

ffi::Error Bf16MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  if (x.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("lcsm_bf16_matmul: x must be float32");
  }
  if (w.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("lcsm_bf16_matmul: w must be bfloat16");
  }
  if (y->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("lcsm_bf16_matmul: the result must be float32");
  }
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const size_t rank = xd.size();
  if (rank < 2 || wd.size() != rank || yd.size() != rank) {
    return ffi::Error::InvalidArgument(
        "lcsm_bf16_matmul: x (..., B, K), w (..., K, N) and y (..., B, N) must have one rank "
        ">= 2; got x " + ShapeText(xd) + ", w " + ShapeText(wd) + ", y " + ShapeText(yd));
  }
  int64_t groups = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (wd[i] != xd[i] || yd[i] != xd[i]) {
      return ffi::Error::InvalidArgument(
          "lcsm_bf16_matmul: leading dims of x, w and y differ: x " + ShapeText(xd) + ", w " +
          ShapeText(wd) + ", y " + ShapeText(yd));
    }
    groups *= xd[i];
  }
  const int64_t batch = xd[rank - 2], depth = xd[rank - 1], width = wd[rank - 1];
  if (wd[rank - 2] != depth || yd[rank - 2] != batch || yd[rank - 1] != width) {
    return ffi::Error::InvalidArgument(
        "lcsm_bf16_matmul: need x (..., B, K), w (..., K, N), y (..., B, N); got x " +
        ShapeText(xd) + ", w " + ShapeText(wd) + ", y " + ShapeText(yd));
  }
  const float* xs = x.typed_data<float>();
  const uint16_t* ws = static_cast<const uint16_t*>(w.untyped_data());
  float* ys = y->typed_data<float>();
  std::vector<float> row(batch > 1 ? width : 0);
  for (int64_t g = 0; g < groups; ++g) {
    MatmulGroup(xs + g * batch * depth, ws + g * depth * width, ys + g * batch * width, batch,
                depth, width, row.data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcsmBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // w
                                  .Ret<ffi::AnyBuffer>()); // y
