"""preftune: Direct Preference Optimization and its family for causal language models.

The Python API mirrors the command line::

    from preftune.config import TrainConfig
    from preftune.train import train

    result = train(TrainConfig(model="smollm2-135m-instruct", data="demo", max_steps=10))
    print(result.run_dir, result.eval_metrics["rewards/accuracies"])

``import preftune`` itself stays light: it does not import torch.
"""

__version__ = "0.1.0"
