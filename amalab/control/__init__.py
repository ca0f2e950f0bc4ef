"""A MuJoCo diagnostic suite for multi-task preference optimization: k reward functions of one simulator
(:mod:`~amalab.control.tasks`), behaviour policies of graded quality, segment pairs labelled by a simulated
teacher, a Gaussian MLP policy trained by the LLM half's training step, and evaluation by true returns."""
