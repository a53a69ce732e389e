"""LayerSkip training maths: per-sample layer dropout, the early-exit curriculum and weights, and
the memory-bounded loss over exits. The model (train/model.py) knows nothing of these; the
trainer asks them, each step, for `keep`, `capture` and `loss_fn`, and passes those to the model."""
from train.layerskip.curriculum import ExitCurriculum, exit_scale
from train.layerskip.dropout import DropPlan, LayerDropout, depth_scale, layer_rates, time_scale
from train.layerskip.exit_loss import ExitLoss, make_exit_loss

__all__ = ["DropPlan", "ExitCurriculum", "ExitLoss", "LayerDropout", "depth_scale", "exit_scale",
           "layer_rates", "make_exit_loss", "time_scale"]
