"""fastbert's fused ops. Each public function checks its arguments, chooses a backend (the one place
that does: see fastbert.backends) and runs it under an autograd Function."""
from fastbert.ops.add_layer_norm import add_layer_norm
from fastbert.ops.attention import attention
from fastbert.ops.bias_gelu import bias_gelu
from fastbert.ops.linear_act import linear_act
from fastbert.ops.linear_gelu import linear_gelu
from fastbert.ops.rotary import rotary

__all__ = ["attention", "add_layer_norm", "bias_gelu", "linear_act", "linear_gelu", "rotary"]
