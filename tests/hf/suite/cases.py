"""Hugging Face's ModelTesterMixin on tiny BERT and RoBERTa models (run by tests/hf/test_hf_suite.py).

This file is not collected by the main test run (its name does not start with test_): the outer test
runs it in a subprocess twice, once on plain HF models and once with every model fastbert-patched
(tests/hf/suite/plugin.py patches each supported base model as it is built), and compares the outcomes.
The model testers below are fastbert's own: the sdist ships the mixin, not HF's per-model tests.
Head dim 16 (hidden 32, 2 heads) is the smallest the C++ and Triton attention kernels take.
"""
import unittest

import torch
import transformers as T
from hf_model_tests.generation.test_utils import GenerationTesterMixin
from hf_model_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
from transformers.testing_utils import torch_device


class _Tester:
    """What ModelTesterMixin reads from `self.model_tester`."""

    batch_size = 13
    seq_length = 7
    is_training = True
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 2
    intermediate_size = 37
    num_choices = 4
    config_class = None
    extra = {}
    pad_token_id = None

    def __init__(self, parent):
        self.parent = parent

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            max_position_embeddings=64, type_vocab_size=16, initializer_range=0.02, **self.extra)

    def prepare_config_and_inputs_for_common(self):
        shape = [self.batch_size, self.seq_length]
        ids = ids_tensor(shape, self.vocab_size)
        if self.pad_token_id is not None:  # no padding token inside a sequence (a tokenizer never puts one)
            ids = ids.masked_fill(ids == self.pad_token_id, self.pad_token_id + 1)
        inputs = {"input_ids": ids,
                  "token_type_ids": ids_tensor(shape, 16),
                  "attention_mask": random_attention_mask(shape)}
        return self.get_config(), inputs


class BertTester(_Tester):
    config_class = T.BertConfig


class RobertaTester(_Tester):
    config_class = T.RobertaConfig
    pad_token_id = 1
    extra = {"pad_token_id": pad_token_id}


def _classes(prefix, names):
    return tuple(getattr(T, f"{prefix}{n}") for n in names if hasattr(T, f"{prefix}{n}"))


class _Suite(ModelTesterMixin, GenerationTesterMixin):
    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class.__name__.endswith("ForPreTraining"):
            # the mixin gives MLM labels only; the pre-training loss also needs the NSP label
            b, s = self.model_tester.batch_size, self.model_tester.seq_length
            inputs["labels"] = torch.zeros(b, s, dtype=torch.long, device=torch_device)
            inputs["next_sentence_label"] = torch.zeros(b, dtype=torch.long, device=torch_device)
        return inputs


class BertModelTest(_Suite, unittest.TestCase):
    all_model_classes = _classes("Bert", ["Model", "ForPreTraining", "ForMaskedLM", "ForNextSentencePrediction",
                                          "ForSequenceClassification", "ForMultipleChoice",
                                          "ForTokenClassification", "ForQuestionAnswering", "LMHeadModel"])

    def setUp(self):
        self.model_tester = BertTester(self)


class RobertaModelTest(_Suite, unittest.TestCase):
    all_model_classes = _classes("Roberta", ["Model", "ForMaskedLM", "ForSequenceClassification",
                                             "ForMultipleChoice", "ForTokenClassification",
                                             "ForQuestionAnswering", "ForCausalLM"])

    def setUp(self):
        self.model_tester = RobertaTester(self)

