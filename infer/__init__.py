"""jaxtx.infer: decoding. `generate` / `stream` (greedy and sampling), `beam_search`, `speculative_generate`,
`embed` (encoder-only), and the pure samplers in `jaxtx.infer.sampling`."""
from jaxtx.infer.generation import Generation, generate, stream
from jaxtx.infer.sampling import GREEDY, Sampling

__all__ = ["GREEDY", "Generation", "Sampling", "generate", "stream"]
