// lora_linear.cpp: functional::lora_linear(), the one choke point of every adapted layer, and its autograd
// Function (the formulas of docs/method.md) for any number of adapters on any rows. The ATen path runs
// under the precision contract of tiedlora/core/functional.h; inside a BackendGuard(Backend::cuda_kernels)
// one adapter on every row of CUDA tensors takes the fused kernels of src/core/cuda/dispatch.h.
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include "core/cuda/dispatch.h"
#include "core/lora_linear_checks.h"
#include "core/precision.h"
#include "tiedlora/core/functional.h"

namespace tiedlora::functional {
namespace {

using namespace detail;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One adapter of a call: where its tensors are in the Function's tensor list (-1: absent), its scale, and
// its rows as rows of the flattened (tokens, features) input.
struct CallSlots {
  int64_t adapter_x = -1, a = -1, b = -1, u = -1, v = -1;
  double scale = 1.0;
  int64_t begin = -1, count = 0;  // a slice [begin, begin + count); begin -1: every row (unless index)
  at::Tensor index;               // gathered rows
};

// What the backward needs besides the saved tensors: the list's layout and the path the forward took.
struct CallLayout : torch::CustomClassHolder {
  int64_t bias = -1;
  at::ScalarType bias_type = at::kFloat;
  std::vector<CallSlots> calls;
  bool cuda_kernels = false;
};

// The list starts with the input and the weight; the bias and every adapter's tensors follow.
constexpr int64_t kX = 0, kWeight = 1;

at::Tensor rows_of(const at::Tensor& t, const CallSlots& c) {
  if (c.index.defined()) return t.index_select(0, c.index);
  return c.begin >= 0 ? t.narrow(0, c.begin, c.count) : t;
}

// The tensor at position i of the list, undefined for -1 (an absent bias, u, v or adapter input).
at::Tensor entry_or_none(at::TensorList t, int64_t i) { return i >= 0 ? t[i] : at::Tensor(); }

// t[rows] += alpha p q, in place (a slice is a view of t; gathered rows are added back with index_add_).
void add_product_to_rows(const at::Tensor& t, const CallSlots& c, const at::Tensor& p, const at::Tensor& q,
                         double alpha = 1.0) {
  if (c.index.defined())
    t.index_add_(0, c.index, p.mm(q), alpha);
  else if (c.begin >= 0)
    t.narrow(0, c.begin, c.count).addmm_(p, q, 1.0, alpha);
  else
    t.addmm_(p, q, 1.0, alpha);
}

// y[rows] += h B_eff^T of one call. Plain LoRA scales the product (s (h B^T), PEFT's order) instead of making a
// scaled copy of B per call; with u or v, B_eff = s diag(v) B diag(u) is formed.
void add_update_to_rows(const at::Tensor& y, const CallSlots& c, const at::Tensor& h, at::TensorList t,
                        at::ScalarType type) {
  if (c.u < 0 && c.v < 0) return add_product_to_rows(y, c, h, as(t[c.b], type).t(), c.scale);
  add_product_to_rows(y, c, h, effective_b_as(t[c.b], entry_or_none(t, c.u), entry_or_none(t, c.v), c.scale, type).t());
}

// dB, du, dv from dB_eff (docs/method.md), each rounded once to its parameter's dtype.
void factor_grads(const at::Tensor& db_eff, const at::Tensor& b, const at::Tensor& u, const at::Tensor& v, double scale,
                  at::ScalarType type, bool need_b, bool need_u, bool need_v, at::Tensor& grad_b, at::Tensor& grad_u,
                  at::Tensor& grad_v) {
  const at::Tensor u_row = u.defined() ? as(u, type).unsqueeze(0) : at::Tensor();
  const at::Tensor v_col = v.defined() ? as(v, type).unsqueeze(1) : at::Tensor();
  if (need_b) {
    at::Tensor db = db_eff * scale;
    if (u_row.defined()) db.mul_(u_row);
    if (v_col.defined()) db.mul_(v_col);
    grad_b = as(db, b.scalar_type());
  }
  const at::Tensor b_c = as(b, type);
  if (need_u) {  // du_j = s sum_i v_i B_ij dB_eff_ij
    at::Tensor t = db_eff * b_c;
    if (v_col.defined()) t.mul_(v_col);
    grad_u = as(t.sum(0).mul_(scale), u.scalar_type());
  }
  if (need_v) {  // dv_i = s sum_j B_ij u_j dB_eff_ij
    at::Tensor t = db_eff * b_c;
    if (u_row.defined()) t.mul_(u_row);
    grad_v = as(t.sum(1).mul_(scale), v.scalar_type());
  }
}

// x W^T + bias over every row in W's storage dtype (fp32 accumulation inside the GEMM; W is never converted,
// the activations are when they differ), returned in `type`: a tensor of the caller's own either way, so the
// branches add to it in place.
at::Tensor frozen_rows(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias, at::ScalarType type) {
  const at::Tensor xg = as(x2, weight.scalar_type());
  return as(bias.defined() ? at::addmm(as(bias, weight.scalar_type()), xg, weight.t()) : xg.mm(weight.t()), type);
}

// Without gradients: how many calls, from call k on, run as one batched GEMM pair (1: call k alone). Those are
// consecutive plain-LoRA calls (no u, v or input of their own) on adjacent slices of one length, with one rank,
// one scale and one factor dtype: a mixed batch sorted by adapter (generate_greedy_batch sorts it), whose
// decode steps would otherwise pay a pair of small GEMMs per adapter.
size_t batched_run(at::TensorList t, const CallLayout& layout, size_t k) {
  auto plain_slice = [&](const CallSlots& c) {
    return c.adapter_x < 0 && c.u < 0 && c.v < 0 && !c.index.defined() && c.begin >= 0;
  };
  const CallSlots& first = layout.calls[k];
  if (layout.cuda_kernels || !plain_slice(first)) return 1;
  size_t n = 1;
  for (; k + n < layout.calls.size(); ++n) {
    const CallSlots &c = layout.calls[k + n], &previous = layout.calls[k + n - 1];
    if (!plain_slice(c) || c.count != first.count || c.begin != previous.begin + previous.count ||
        c.scale != first.scale || !t[c.a].sizes().equals(t[first.a].sizes()) ||
        t[c.a].scalar_type() != t[first.a].scalar_type() || t[c.b].scalar_type() != t[first.b].scalar_type())
      break;
  }
  return n;
}

// y[rows of calls k..k+n) += s (x A_i^T) B_i^T for each call i as two bmm over the calls (batched_run above):
// each row's own adapter only, the per-call path's products and order (s applied to the product, PEFT's order).
void add_batched_updates(const at::Tensor& y, const at::Tensor& x2, at::TensorList t, const CallLayout& layout,
                         size_t k, size_t n, const StackedFactors* stacked, at::ScalarType type) {
  const CallSlots& first = layout.calls[k];
  const auto calls = static_cast<int64_t>(n), rows = first.count, in = x2.size(1), out = y.size(1);
  at::Tensor a, b;
  if (stacked && stacked->lora_a.scalar_type() == type) {
    a = stacked->lora_a.narrow(0, static_cast<int64_t>(k), calls);
    b = stacked->lora_b.narrow(0, static_cast<int64_t>(k), calls);
  } else {
    std::vector<at::Tensor> as_of_calls, bs_of_calls;
    for (size_t i = k; i < k + n; ++i) {
      as_of_calls.push_back(as(t[layout.calls[i].a], type));
      bs_of_calls.push_back(as(t[layout.calls[i].b], type));
    }
    a = at::stack(as_of_calls);
    b = at::stack(bs_of_calls);
  }
  const at::Tensor x3 = as(x2.narrow(0, first.begin, calls * rows), type).reshape({calls, rows, in});
  const at::Tensor h = at::bmm(x3, a.transpose(1, 2));  // (calls, rows, r)
  y.narrow(0, first.begin, calls * rows).view({calls, rows, out}).baddbmm_(h, b.transpose(1, 2), 1.0, first.scale);
}

// y = x W^T + bias + each call's update on its rows. `saved`, when given, gets h of each call (the backward's
// saved tensors after the list); without it (no gradient) runs of calls may be batched (batched_run).
at::Tensor forward_rows(at::TensorList t, const CallLayout& layout, std::vector<at::Tensor>* saved,
                        const StackedFactors* stacked = nullptr) {
  const at::Tensor &x = t[kX], &weight = t[kWeight];
  const at::Tensor bias = entry_or_none(t, layout.bias);
  const int64_t in = weight.size(1), out = weight.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;

  if (layout.cuda_kernels) {  // cuBLASLt: y = x W^T + bias, then y += h B_eff^T in x's dtype; h kept in x's dtype
    const CallSlots& c = layout.calls[0];
    const auto dtype = x.scalar_type();
    const at::Tensor x2 = row_strided(x.reshape({-1, in}));
    const at::Tensor xa2 = c.adapter_x >= 0 ? row_strided(t[c.adapter_x].reshape({-1, in})) : at::Tensor();
    at::Tensor y = at::empty({x2.size(0), out}, x.options());
    at::Tensor h = at::empty({x2.size(0), t[c.a].size(0)}, x.options());
    cuda::lora_forward_out(y, h, x2, xa2, row_strided(weight), bias.defined() ? as(bias, dtype).contiguous() : bias,
                           row_strided(as(t[c.a], dtype)),
                           cuda::effective_b(t[c.b], entry_or_none(t, c.u), entry_or_none(t, c.v), c.scale, dtype));
    if (saved) saved->push_back(h);
    return y.reshape(out_shape);
  }

  // The frozen matmul once over every row (frozen_rows), each branch in fp32 (fp64 for double activations) on
  // its rows. fp32 weights: one accumulator, one rounding; bf16/fp16 weights: the GEMM's
  // rounding of x W^T, then the updates added in fp32 and rounded once more (PEFT rounds as often).
  const auto type = compute_type(x.scalar_type());
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor y = frozen_rows(x2, weight, bias, type);
  for (size_t k = 0; k < layout.calls.size();) {
    const size_t n = saved ? 1 : batched_run(t, layout, k);
    if (n > 1) {
      add_batched_updates(y, x2, t, layout, k, n, stacked, type);
      k += n;
      continue;
    }
    const CallSlots& c = layout.calls[k++];
    const at::Tensor branch_in = c.adapter_x >= 0 ? t[c.adapter_x].reshape({-1, in}) : rows_of(x2, c);
    const at::Tensor h = as(branch_in, type).mm(as(t[c.a], type).t());  // (rows, r), kept for dB_eff
    add_update_to_rows(y, c, h, t, type);
    if (saved) saved->push_back(h);
  }
  return as(y, x.scalar_type()).reshape(out_shape);
}

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList t, const c10::intrusive_ptr<CallLayout>& layout) {
    std::vector<at::Tensor> saved(t.begin(), t.end());  // then h of each call
    at::Tensor y = forward_rows(t, *layout, &saved);
    ctx->saved_data["layout"] = at::IValue::make_capsule(layout);
    ctx->save_for_backward(saved);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Dtypes are chosen here explicitly; autocast (if the caller's backward runs under it) must not recast.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list saved = ctx->get_saved_variables();
    const auto layout = c10::static_intrusive_pointer_cast<CallLayout>(ctx->saved_data["layout"].toCapsule());
    const size_t listed = saved.size() - layout->calls.size();  // the tensor list; h of each call after it
    variable_list grads(listed + 1);                            // the layout gets no gradient
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return grads;
    auto needs = [&](int64_t i) { return i >= 0 && ctx->needs_input_grad(static_cast<size_t>(i)); };
    const at::Tensor &x = saved[kX], &weight = saved[kWeight];
    const int64_t in = weight.size(1), out = weight.size(0);

    if (layout->cuda_kernels) {  // the forward took the kernels: h is in x's dtype
      const CallSlots& c = layout->calls[0];
      const at::Tensor &a = saved[c.a], &b = saved[c.b], &h = saved[listed];
      const auto dtype = x.scalar_type();
      const at::Tensor dy = row_strided(as(grad_y, dtype).reshape({-1, out}));
      const int64_t m = dy.size(0), r = a.size(0);
      const at::Tensor x2 = row_strided(x.reshape({-1, in}));
      const at::Tensor adapter_x = entry_or_none(saved, c.adapter_x);
      const at::Tensor xa2 = adapter_x.defined() ? row_strided(adapter_x.reshape({-1, in})) : at::Tensor();
      const at::TensorOptions fp32 = dy.options().dtype(at::kFloat);
      const bool need_b = needs(c.b), need_u = needs(c.u), need_v = needs(c.v);
      const at::Tensor dx = needs(kX) ? at::empty({m, in}, dy.options()) : at::Tensor();
      const at::Tensor dxa = needs(c.adapter_x) ? at::empty({m, in}, dy.options()) : at::Tensor();
      const at::Tensor da = needs(c.a) ? at::empty({r, in}, fp32) : at::Tensor();
      const at::Tensor db_eff = need_b || need_u || need_v ? at::empty({out, r}, fp32) : at::Tensor();
      cuda::lora_backward_out(
          dx, dxa, da, db_eff, dy, x2, xa2, row_strided(weight), row_strided(as(a, dtype)),
          cuda::effective_b(b, entry_or_none(saved, c.u), entry_or_none(saved, c.v), c.scale, dtype), h);
      if (dx.defined()) grads[kX] = dx.reshape(x.sizes());
      if (dxa.defined()) grads[c.adapter_x] = dxa.reshape(adapter_x.sizes());
      if (needs(layout->bias)) grads[layout->bias] = as(at::sum(dy, {0}, false, at::kFloat), layout->bias_type);
      if (da.defined()) grads[c.a] = as(da, a.scalar_type());
      if (db_eff.defined()) {
        at::Tensor gu, gv;
        factor_grads(db_eff, b, entry_or_none(saved, c.u), entry_or_none(saved, c.v), c.scale, at::kFloat, need_b,
                     need_u, need_v, grads[c.b], gu, gv);
        if (need_u) grads[c.u] = gu;
        if (need_v) grads[c.v] = gv;
      }
      return grads;
    }

    const auto type = compute_type(x.scalar_type());
    const at::Tensor dy_act = grad_y.reshape({-1, out});
    const at::Tensor dy = as(dy_act, type);
    const size_t n = layout->calls.size();
    std::vector<at::Tensor> dy_rows(n), dh(n), a_c(n);
    bool branch_into_dx = false;
    for (size_t k = 0; k < n; ++k) {
      const CallSlots& c = layout->calls[k];
      dy_rows[k] = rows_of(dy, c);
      a_c[k] = as(saved[c.a], type);
      dh[k] = dy_rows[k].mm(effective_b_as(saved[c.b], entry_or_none(saved, c.u), entry_or_none(saved, c.v), c.scale,
                                           type));  // (rows, r)
      branch_into_dx = branch_into_dx || c.adapter_x < 0;
    }
    if (needs(kX)) {
      // dY W in W's storage dtype (W never converted), then + dH A of each branch on its rows in fp32,
      // rounded once to x's dtype.
      at::Tensor dx = as(dy_act, weight.scalar_type()).mm(weight);
      if (branch_into_dx) {
        dx = as(dx, type);
        for (size_t k = 0; k < n; ++k) {
          if (layout->calls[k].adapter_x < 0) add_product_to_rows(dx, layout->calls[k], dh[k], a_c[k]);
        }
      }
      grads[kX] = as(dx, x.scalar_type()).reshape(x.sizes());
    }
    if (needs(layout->bias)) grads[layout->bias] = as(dy.sum(0), layout->bias_type);
    for (size_t k = 0; k < n; ++k) {
      const CallSlots& c = layout->calls[k];
      const at::Tensor adapter_x = entry_or_none(saved, c.adapter_x);
      if (needs(c.adapter_x)) {
        grads[c.adapter_x] = as(dh[k].mm(a_c[k]), adapter_x.scalar_type()).reshape(adapter_x.sizes());
      }
      if (needs(c.a)) {
        const at::Tensor branch_in =
            adapter_x.defined() ? adapter_x.reshape({-1, in}) : rows_of(x.reshape({-1, in}), c);
        grads[c.a] = as(dh[k].t().mm(as(branch_in, type)), saved[c.a].scalar_type());
      }
      const bool need_b = needs(c.b), need_u = needs(c.u), need_v = needs(c.v);
      if (need_b || need_u || need_v) {
        const at::Tensor db_eff = dy_rows[k].t().mm(saved[listed + k]);  // (d_out, r)
        at::Tensor gu, gv;
        factor_grads(db_eff, saved[c.b], entry_or_none(saved, c.u), entry_or_none(saved, c.v), c.scale, type, need_b,
                     need_u, need_v, grads[c.b], gu, gv);
        if (need_u) grads[c.u] = gu;
        if (need_v) grads[c.v] = gv;
      }
    }
    return grads;  // W never gets a gradient (checked frozen in lora_linear); the layout is not a tensor
  }
};

// Rows of the first dimension as rows of the flattened (tokens, features) input: `per_row` tokens each.
void set_token_rows(CallSlots& slots, const AdapterRows& rows, int64_t per_row) {
  if (rows.index.defined()) {
    slots.index = per_row == 1
                      ? rows.index
                      : (rows.index.unsqueeze(1) * per_row + at::arange(per_row, rows.index.options())).reshape({-1});
  } else if (rows.begin >= 0) {
    slots.begin = rows.begin * per_row;
    slots.count = (rows.end - rows.begin) * per_row;
  }
}

}  // namespace

at::Tensor lora_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       c10::ArrayRef<AdapterCall> calls, const StackedFactors* stacked) {
  if (calls.empty()) return at::linear(input, weight, bias);  // no adapter: torch::nn::Linear, trainable W or not
  check_layer(input, weight, bias);
  for (const AdapterCall& call : calls) check_call(input, weight, call);
  if (stacked && stacked->defined())
    check_stacked(*stacked, calls);
  else
    stacked = nullptr;
  // Autocast: the layer does what torch::nn::Linear does under the same autocast (PyTorch's
  // custom_fwd(cast_inputs=...)): the input, the weight and the bias go to the autocast dtype (autocast's
  // own cast, which copies only what is stored in another dtype), the function runs with autocast off, and
  // returns the autocast dtype. The adapter factors keep their dtype (fp32), as PEFT keeps them. As autocast
  // itself, only fp32/fp16/bf16 tensors are cast (a double layer stays double).
  const std::optional<at::ScalarType> autocast = autocast_dtype(input);
  if (!autocast) check_16bit_pair(input, weight);
  auto cast = [&](const at::Tensor& t) {
    return autocast && t.defined() && t.scalar_type() != at::kDouble ? as(t, *autocast) : t;
  };
  const at::Tensor x = cast(input), w = cast(weight), b0 = cast(bias);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  auto layout = c10::make_intrusive<CallLayout>();
  std::vector<at::Tensor> list{x, w};
  list.reserve(2 + 1 + 5 * calls.size());
  auto push = [&](const at::Tensor& t) {
    if (!t.defined()) return int64_t{-1};
    list.push_back(t);
    return static_cast<int64_t>(list.size()) - 1;
  };
  layout->bias = push(b0);
  layout->bias_type = b0.defined() ? b0.scalar_type() : w.scalar_type();
  // Tokens per row of the first dimension (the batch): rows of a routed batch are this many tokens each.
  int64_t per_row = 1;
  for (int64_t d = 1; d + 1 < x.dim(); ++d) per_row *= x.size(d);
  for (const AdapterCall& call : calls) {
    CallSlots slots;
    slots.adapter_x = push(cast(call.adapter_input));
    slots.a = push(call.update.lora_a);
    slots.b = push(call.update.lora_b);
    slots.u = push(call.update.u);
    slots.v = push(call.update.v);
    slots.scale = call.update.scale;
    set_token_rows(slots, call.rows, per_row);
    layout->calls.push_back(std::move(slots));
  }
  const CallSlots& first = layout->calls.front();
  layout->cuda_kernels =
      calls.size() == 1 && calls[0].rows.every_row() &&
      use_cuda_kernels(x, first.adapter_x >= 0 ? list[first.adapter_x] : at::Tensor(), w, b0, calls[0].update);
  // Nothing to differentiate (generation and evaluation run under NoGradGuard): the same forward without an
  // autograd node and its saved tensors, which a decode step would otherwise pay per layer.
  if (!at::GradMode::is_enabled()) return forward_rows(list, *layout, nullptr, stacked);
  return LoraLinearFunction::apply(at::TensorList(list), layout);
}

}  // namespace tiedlora::functional
