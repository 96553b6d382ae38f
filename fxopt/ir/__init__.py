"""The IR: a ``torch.fx.GraphModule`` and what every layer above relies on.

Capture (``capture``) and the module hooks it traces in (``hooks``), canonical forms
(``canonical``), the activation table (``activations``), graph utilities (``graph``), purity and
aliasing facts (``purity``), the structural verifier (``verify``), recorded runs and
first-divergence blame (``check``), MAC counts (``metrics``), the tolerance table
(``tolerances``) and precision conversion (``precision``). Nothing here imports ops, passes or
the pass infrastructure.
"""
