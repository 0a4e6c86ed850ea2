"""Plugin hooks. A plugin is a module (or object) implementing any of these with `@hookimpl`.

Each hook receives a `register` callback; call it once per class you provide:

    from rlhfzoo import hookimpl

    @hookimpl
    def register_objectives(register):
        register(MyObjective)                    # metadata is read from the class attributes
        register(MyOtherObjective, name="my-other", aliases=("mo",))

Built-in plugins are loaded exactly like third-party ones, which are discovered from the
entry-point group `rlhfzoo` (see README, "Writing a plugin").
"""

import pluggy

PROJECT = "rlhfzoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_objectives(register):
    """Register `Objective` subclasses (algorithms, including SFT and reward-model training)."""


@hookspec
def register_reward_sources(register):
    """Register `RewardSource` subclasses."""


@hookspec
def register_policies(register):
    """Register `Policy` subclasses (model backends and decoding wrappers)."""


@hookspec
def register_tasks(register):
    """Register `Task` subclasses (data, tokenizers, gold rewards)."""


@hookspec
def register_stages(register):
    """Register `Stage` subclasses (cached, expensive steps other plugins read: a task's SFT
    policy, its reward model, ...; built by `rlhfzoo.stages`)."""
