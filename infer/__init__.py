"""jaxtx.infer (files in infer/: `jaxtx.infer.generation` lives in `infer/generation.py`): decoding. `generate` /
`stream` (greedy and sampling), `beam_search`, `speculative_generate`, `embed` (encoder-only), and `Sampling` (from
core's `jaxtx.sampling`). See the README's inference section. Decoding picks the fast (unrolled) layer layout itself;
`for_decoding` keeps it for callers that drive the model step by step. Imports jaxtx core, never jaxtx.train."""
from jaxtx.infer.beam import BeamResult, beam_search
from jaxtx.infer.embed import embed
from jaxtx.infer.generation import Generation, for_decoding, generate, stream
from jaxtx.sampling import GREEDY, Sampling
from jaxtx.infer.speculative import SpeculativeResult, speculative_generate

__all__ = ["GREEDY", "BeamResult", "Generation", "Sampling", "SpeculativeResult", "beam_search", "embed",
           "for_decoding", "generate", "speculative_generate", "stream"]
