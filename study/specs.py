"""The stages a study can run, by name: each stage package's exported spec (studykit/stage.py).

Adding a stage to the tool means writing its package with a ``spec.py`` and listing it here; study
kinds (configs/study/kinds/*.yaml) then use it by this name.
"""

from __future__ import annotations

from eval.spec import ANTILAB, BACKDOOR
from eval.spec import SPEC as EVAL
from finetune.spec import RL
from finetune.spec import SPEC as FINETUNE
from studykit.stage import StageSpec
from synthdocs.spec import POLICY
from synthdocs.spec import SPEC as GENERATE

SPECS: dict[str, StageSpec] = {spec.kind: spec for spec in (GENERATE, POLICY, FINETUNE, RL, EVAL, BACKDOOR, ANTILAB)}
