"""The model: megatron specs (:mod:`.spec`), building GPTModel chunks (:mod:`.build`), layout-independent
initialisation (:mod:`.init`), parameter and FLOP accounting (:mod:`.accounting`), and the layers (:mod:`.layers`:
CoLA projections, attention core, RMSNorm, CoLA-M)."""
