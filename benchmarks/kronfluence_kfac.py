"""kronfluence's K-FAC factor fitting on the statistic of our hooks backend (a comparator).

kronfluence (Grosse et al. 2023; the production K-FAC code for LLM influence functions) fits
per tracked ``nn.Linear`` the token-level sums ``sum_t a_t a_t^T`` of its inputs (padding
zeroed by the attention mask) and ``sum_t g_t g_t^T`` of its output gradients, from the loss
our task returns (the summed NLL of supervised tokens). Tracking peft's ``lora_A`` (input:
the layer input ``x``) and ``lora_B`` (output gradient ``s g``) gives our base-layer factors:

.. math::

    C_x = \\frac{\\sum_t x_t x_t^\\top}{T},\\qquad G_h = \\frac{\\sum_t (s g_t)(s g_t)^\\top}{s^2 N}

with ``T`` the counted positions and ``N`` the supervised tokens. (kronfluence divides both sums
by ``T``, its count of attention-mask positions; ours divides the gradient sum by ``N``, see
docs/math.md section 3.) It also fits the small ``r x r`` factors of lora_A's output and
lora_B's input, and writes its factors to disk: both are part of its cost.
"""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _tracked(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]


class KronfluenceKFAC:
    """Prepared once (a copy of the model wrapped by kronfluence); :meth:`fit` is the timed part."""

    def __init__(
        self, model: nn.Module, batches: list[dict[str, Tensor]], estimator: str, dtype=None
    ) -> None:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task

        names = _tracked(model)
        mc = estimator == "mc"
        generator = torch.Generator().manual_seed(0)

        class CausalLMTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                logits = logits.logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                if sample:  # labels drawn from the model at the supervised positions
                    with torch.no_grad():
                        probs = logits.softmax(-1).reshape(-1, logits.size(-1))
                        drawn = torch.multinomial(probs, 1, generator=generator).view_as(labels)
                    labels = torch.where(labels == -100, labels, drawn)
                return F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )

            def compute_measurement(self, batch, model):
                return self.compute_train_loss(batch, model)

            def get_influence_tracked_modules(self):
                return names

            def get_attention_mask(self, batch):
                return batch["attention_mask"]

        self.task = CausalLMTask()
        self.model = prepare_model(copy.deepcopy(model), self.task)
        self.out = tempfile.TemporaryDirectory()
        self.analyzer = Analyzer(
            "bench",
            self.model,
            self.task,
            output_dir=self.out.name,
            disable_tqdm=True,
            disable_model_save=True,
            cpu=True,
        )
        stats = dtype or torch.float32
        self.args = FactorArguments(
            strategy="kfac",
            use_empirical_fisher=not mc,
            activation_covariance_dtype=stats,
            gradient_covariance_dtype=stats,
        )
        self.dataset = _Rows(batches)
        self.batch_size = batches[0]["input_ids"].shape[0]

    def fit(self) -> None:
        self.analyzer.fit_covariance_matrices(
            "factors",
            self.dataset,
            per_device_batch_size=self.batch_size,
            factor_args=self.args,
            overwrite_output_dir=True,
        )

    def factors(self, modules: dict, supervised_tokens: int) -> dict[str, dict[str, Tensor]]:
        """``{module: {"C_x": ..., "G_h": ...}}`` in our normalisation (see the module doc)."""
        cov = self.analyzer.load_covariance_matrices("factors")
        out = {}
        for name, spec in modules.items():
            a, b = f"{name}.lora_A.default", f"{name}.lora_B.default"
            positions = float(cov["num_activation_covariance_processed"][a])
            out[name] = {
                "C_x": cov["activation_covariance"][a] / positions,
                "G_h": cov["gradient_covariance"][b] / spec.scaling**2 / supervised_tokens,
            }
        return out


class _Rows(torch.utils.data.Dataset):
    """The rows of the batches, in order (kronfluence's loader re-forms the same batches)."""

    def __init__(self, batches: list[dict[str, Tensor]]) -> None:
        self.rows = [
            {k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.rows[i]
