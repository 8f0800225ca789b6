"""Model layers: CoLA projections (both TP schemes), the SDPA attention core, RMSNorm, and CoLA-M."""
