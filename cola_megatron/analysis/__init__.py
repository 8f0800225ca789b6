"""Tools that measure and plan rather than train: the layout planner, the TP communication report and counter,
the side-by-side benchmark, run comparison, experiments, and a local multi-process launcher."""
