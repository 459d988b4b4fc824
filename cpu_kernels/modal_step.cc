// One step of the 'modal' strategy's diagonal complex recurrence, in place, for XLA:CPU.
//
// Per stream s, batch row b, pole h and channel d, with the state x = xr + i xi, the poles
// p = pr + i pi, the step residues R p = rr + i ri and the residue sum total = Re sum_h R:
//
//   y[s, b, d]         = sum_h (rr xr - ri xi)[s, b, h, d] + total[s, d] a[s, b, d]
//   xr'[s, b, h, d]    = pr xr - pi xi + a[s, b, d]
//   xi'[s, b, h, d]    = pr xi + pi xr
//
// (y = Re sum_h R x' from the state before the update: the next position's pending outputs.)
// XLA:CPU computes this as several fusions that each read the state planes, and copies the
// planes every step; this handler reads each state element once and writes it back in place
// (the state operands are aliased to the state results by `input_output_aliases`).
//
// Operands (row-major, float32, shapes checked here, errors returned as FFI InvalidArgument):
//   xr, xi:    (S, B, H, D)   the state's real and imaginary planes
//   poles:     (2, S, H, D)   Re p, Im p
//   residues:  (2, S, H, D)   Re (R p), Im (R p)
//   total:     (S, D)         Re sum_h R
//   a:         (S, B, D)      this position's inputs
// Results:
//   xr', xi':  (S, B, H, D)   the updated state (the same buffers as xr, xi when XLA aliases
//                             them; separate buffers are first filled with a copy)
//   y:         (S, B, D)
//
// Loop order: s, b, then h, then d innermost (unit stride over the channels, which GCC
// vectorises at -O3; -march=native picks the vector width). y[s, b, :] starts at total * a and
// adds the poles' terms in increasing h, in float32.
//
// Built and registered by modal_step.py; the exported symbol is LcsmModalStep.

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Row {  // the operands of one (s, b) row; the tables' pointers are at stream s
  const float* pr;
  const float* pi;
  const float* rr;
  const float* ri;
  const float* total;
  const float* a;
  float* y;
};

// One pole's row of one (s, b) block: adds its terms to y and updates xr, xi in place (restrict
// parameters, so that GCC vectorises without run-time alias checks).
inline void PoleRow(const float* __restrict pr, const float* __restrict pi,
                    const float* __restrict rr, const float* __restrict ri,
                    const float* __restrict a, float* __restrict y, float* __restrict xr,
                    float* __restrict xi, int64_t width) {
  for (int64_t d = 0; d < width; ++d) {
    const float re = xr[d], im = xi[d];
    y[d] += rr[d] * re - ri[d] * im;
    xr[d] = pr[d] * re - pi[d] * im + a[d];
    xi[d] = pr[d] * im + pi[d] * re;
  }
}

inline void Scale(const float* __restrict total, const float* __restrict a,
                  float* __restrict y, int64_t width) {
  for (int64_t d = 0; d < width; ++d) y[d] = total[d] * a[d];
}

// One (s, b) block: y = total * a, then the poles' rows in increasing h.
void Block(const Row& row, float* xr, float* xi, int64_t poles, int64_t width) {
  Scale(row.total, row.a, row.y, width);
  for (int64_t h = 0; h < poles; ++h) {
    const int64_t at = h * width;
    PoleRow(row.pr + at, row.pi + at, row.rr + at, row.ri + at, row.a, row.y, xr + at, xi + at,
            width);
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

bool Is(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want) {
  if (dims.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) {
    if (dims[i++] != w) return false;
  }
  return true;
}

ffi::Error ModalStepImpl(ffi::AnyBuffer xr, ffi::AnyBuffer xi, ffi::AnyBuffer poles,
                         ffi::AnyBuffer residues, ffi::AnyBuffer total, ffi::AnyBuffer a,
                         ffi::Result<ffi::AnyBuffer> xr_out, ffi::Result<ffi::AnyBuffer> xi_out,
                         ffi::Result<ffi::AnyBuffer> y) {
  const ffi::AnyBuffer* operands[] = {&xr, &xi, &poles, &residues, &total, &a};
  const char* names[] = {"xr", "xi", "poles", "residues", "total", "a"};
  for (int i = 0; i < 6; ++i) {
    if (operands[i]->element_type() != ffi::DataType::F32) {
      return ffi::Error::InvalidArgument(std::string("lcsm_modal_step: ") + names[i] +
                                         " must be float32");
    }
  }
  if (xr_out->element_type() != ffi::DataType::F32 ||
      xi_out->element_type() != ffi::DataType::F32 || y->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("lcsm_modal_step: the results must be float32");
  }
  const auto xd = xr.dimensions();
  if (xd.size() != 4) {
    return ffi::Error::InvalidArgument("lcsm_modal_step: xr must be (S, B, H, D); got " +
                                       ShapeText(xd));
  }
  const int64_t streams = xd[0], batch = xd[1], num_poles = xd[2], width = xd[3];
  if (!Is(xi.dimensions(), {streams, batch, num_poles, width}) ||
      !Is(poles.dimensions(), {2, streams, num_poles, width}) ||
      !Is(residues.dimensions(), {2, streams, num_poles, width}) ||
      !Is(total.dimensions(), {streams, width}) ||
      !Is(a.dimensions(), {streams, batch, width}) ||
      !Is(xr_out->dimensions(), {streams, batch, num_poles, width}) ||
      !Is(xi_out->dimensions(), {streams, batch, num_poles, width}) ||
      !Is(y->dimensions(), {streams, batch, width})) {
    return ffi::Error::InvalidArgument(
        "lcsm_modal_step: need xr, xi, xr', xi' (S, B, H, D), poles and residues (2, S, H, D), "
        "total (S, D), a and y (S, B, D); got xr " + ShapeText(xd) + ", xi " +
        ShapeText(xi.dimensions()) + ", poles " + ShapeText(poles.dimensions()) + ", residues " +
        ShapeText(residues.dimensions()) + ", total " + ShapeText(total.dimensions()) + ", a " +
        ShapeText(a.dimensions()) + ", xr' " + ShapeText(xr_out->dimensions()) + ", xi' " +
        ShapeText(xi_out->dimensions()) + ", y " + ShapeText(y->dimensions()));
  }
  const float* xrs = xr.typed_data<float>();
  const float* xis = xi.typed_data<float>();
  float* xro = xr_out->typed_data<float>();
  float* xio = xi_out->typed_data<float>();
  const float* ps = poles.typed_data<float>();
  const float* rs = residues.typed_data<float>();
  const float* ts = total.typed_data<float>();
  const float* as = a.typed_data<float>();
  float* ys = y->typed_data<float>();
  const int64_t plane = streams * num_poles * width;  // one plane of poles / residues
  const int64_t block = num_poles * width;            // one (s, b) block of the state
  // XLA passes the state's buffers as the results' (aliased); otherwise start from a copy.
  if (xro != xrs) std::memcpy(xro, xrs, sizeof(float) * batch * streams * block);
  if (xio != xis) std::memcpy(xio, xis, sizeof(float) * batch * streams * block);
  for (int64_t s = 0; s < streams; ++s) {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t row = s * batch + b;
      const Row r{ps + s * block,         ps + plane + s * block, rs + s * block,
                  rs + plane + s * block, ts + s * width,         as + row * width,
                  ys + row * width};
      Block(r, xro + row * block, xio + row * block, num_poles, width);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcsmModalStep, ModalStepImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // xr
                                  .Arg<ffi::AnyBuffer>()   // xi
                                  .Arg<ffi::AnyBuffer>()   // poles (2, S, H, D)
                                  .Arg<ffi::AnyBuffer>()   // residues (2, S, H, D)
                                  .Arg<ffi::AnyBuffer>()   // total (S, D)
                                  .Arg<ffi::AnyBuffer>()   // a (S, B, D)
                                  .Ret<ffi::AnyBuffer>()   // xr'
                                  .Ret<ffi::AnyBuffer>()   // xi'
                                  .Ret<ffi::AnyBuffer>()); // y
