"""fastbert's fused ops. Each public function checks its arguments, chooses a backend (the one place
that does: see fastbert.backends) and runs it under an autograd Function."""
from fastbert.ops.attention import attention
from fastbert.ops.ffn import bias_gelu, linear_gelu
from fastbert.ops.layer_norm import add_layer_norm

__all__ = ["attention", "add_layer_norm", "bias_gelu", "linear_gelu"]
