"""medvqa-harness: benchmark and train medical VQA models, and measure how much labeled data they need.

Data flows one way: benchmark → samples → model adapter → predictions → scorer → scores →
results table → report. Trainers sit beside it and produce checkpoints, which are model specs.
"""

__version__ = "0.1.0"
