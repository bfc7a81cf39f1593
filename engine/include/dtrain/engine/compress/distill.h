// Knowledge distillation loss (Hinton et al., 2015).
//
//   kd_loss(s, t, y, T, alpha) =
//       alpha * T^2 * KL(softmax(t/T) || softmax(s/T))  +  (1 - alpha) * CE(s, y)
//
// s: student logits [B,C], t: teacher logits [B,C] (detached: no gradient flows to
// the teacher), y: i64 labels [B]. KL is summed over the classes and averaged over
// the batch (PyTorch's kl_div(..., reduction="batchmean")); CE is cross_entropy's
// mean. The T^2 keeps the soft term's gradient on the scale of the hard one. Built
// from differentiable ops, so it runs in f32 or f64 on any device the ops support.
// Errors: InvalidArgument for T <= 0 or alpha outside [0,1]; ShapeError when s and t
// differ or are not [B,C].
#pragma once

#include "dtrain/engine/tensor.h"

namespace dtrain::compress {

Tensor kd_loss(const Tensor& student_logits, const Tensor& teacher_logits, const Tensor& target,
               double temperature, double alpha);

}  // namespace dtrain::compress
