#include "dtrain/engine/compress/distill.h"

#include "dtrain/common/error.h"
#include "dtrain/engine/ops.h"

namespace dtrain::compress {

Tensor kd_loss(const Tensor& student_logits, const Tensor& teacher_logits, const Tensor& target,
               double temperature, double alpha) {
  DTRAIN_CHECK(temperature > 0, InvalidArgument, "kd_loss: temperature must be > 0, got {}",
               temperature);
  DTRAIN_CHECK(alpha >= 0 && alpha <= 1, InvalidArgument, "kd_loss: alpha must be in [0,1], got {}",
               alpha);
  DTRAIN_CHECK(student_logits.dim() == 2 && student_logits.shape() == teacher_logits.shape(),
               ShapeError,
               "kd_loss: expected student and teacher logits [B,C] of one shape, got {} and {}",
               shape_str(student_logits.shape()), shape_str(teacher_logits.shape()));
  const double inv_t = 1.0 / temperature;
  Tensor t = mul_scalar(teacher_logits.detach().to(student_logits.dtype()), inv_t);
  Tensor log_p = log_softmax(t, 1);  // teacher, constant
  Tensor p = softmax(t, 1);
  Tensor log_q = log_softmax(mul_scalar(student_logits, inv_t), 1);
  Tensor kl = sum(mul(p, sub(log_p, log_q)));
  const double batch = static_cast<double>(student_logits.size(0));
  Tensor soft = mul_scalar(kl, alpha * temperature * temperature / batch);
  if (alpha == 1.0) return soft;
  return add(soft, mul_scalar(cross_entropy(student_logits, target), 1.0 - alpha));
}

}  // namespace dtrain::compress
