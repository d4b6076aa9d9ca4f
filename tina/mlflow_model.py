"""The registered generator: an MLflow pyfunc model logged from code (`tina.tracking`).

MLflow runs this file when the model is logged and when it is loaded ("models from code"): it
defines `TinaGeneratorModel` and hands an instance to `mlflow.models.set_model`; the weights come
from the checkpoint folder logged as the artifact "checkpoint". Nothing is pickled.

    model = mlflow.pyfunc.load_model("models:/tina-demo/1")
    out = model.predict([{"classes": ["sneaker", "digit 4"], "seed": 0}])[0]
    out.classes, out.params     # ordered class names, the k-row classifier's flat parameters

`params` are exactly what `tina generate --checkpoint <ckpt> --class ... --seed ...` writes to
model.safetensors: the tensors of the module's state_dict in `param_names` order, flattened.
"""

from __future__ import annotations

import mlflow
import torch
from pydantic import BaseModel

from tina.generate import Generator, load_generator, prompt_seed


class GenerateRequest(BaseModel):
    """One classifier to generate."""

    classes: list[str]  # 1..K_max class names (or descriptions), in output order
    seed: int = 0  # the same seed as `tina generate --seed`
    sampler: str | None = None  # "ddim" | "ddpm"; None: the checkpoint's default
    steps: int | None = None  # DDIM steps; None: the checkpoint's (val-selected) default
    guidance: float | None = None  # classifier-free guidance scale; None: the checkpoint's


class GeneratedModel(BaseModel):
    """A generated classifier as flat parameters (float32 values as floats)."""

    classes: list[str]  # canonical names, in output order (logit i = classes[i])
    params: list[float]  # (P,) the state_dict tensors flattened and concatenated
    param_names: list[str]  # state_dict keys, in the order of `params`
    param_shapes: list[list[int]]  # their shapes
    seed: int
    prompt_seed: int  # the noise seed tina.generate.prompt_seed(seed, classes) derived
    sampler: str
    steps: int
    guidance: float


class TinaGeneratorModel(mlflow.pyfunc.PythonModel):
    """Class names and a seed -> a generated classifier's parameters (one sampler call each)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # the prompt encoder named in the checkpoint's tina.json is built here (offline)
        self.generator: Generator = load_generator(context.artifacts["checkpoint"])

    def predict(self, context: mlflow.pyfunc.PythonModelContext,
                model_input: list[GenerateRequest], params=None) -> list[GeneratedModel]:
        """Each request alone, as `tina generate` does: a batch would change float rounding
        (~1e-6), and the registered model must give exactly the CLI's parameters.

        Raises:
            tina.errors.PromptError: empty prompt, more than K_max classes, duplicate names,
                bad sampler settings.
        """
        gen, s, out = self.generator, self.generator.meta["sample"], []
        for r in model_input:
            model = gen.generate([r.classes], [r.seed], sampler=r.sampler, steps=r.steps,
                                 guidance=r.guidance)[0]
            state = model.state_dict()
            out.append(GeneratedModel(
                classes=[gen.label_space.canonical(n) if gen._lookup(n) >= 0 else n
                         for n in r.classes],
                params=torch.cat([v.reshape(-1) for v in state.values()]).tolist(),
                param_names=list(state), param_shapes=[list(v.shape) for v in state.values()],
                seed=r.seed, prompt_seed=prompt_seed(r.seed, r.classes),
                sampler=r.sampler or s["sampler"],
                steps=s["steps"] if r.steps is None else r.steps,
                guidance=s["guidance"] if r.guidance is None else r.guidance))
        return out


mlflow.models.set_model(TinaGeneratorModel())
