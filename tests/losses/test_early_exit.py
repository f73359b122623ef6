"""Early-exit heads and their loss (`distill.losses.early_exit`) on a tiny BERT: a head started from the model's own
head and put on its last layer gives the model's logits; the heads reload from their two files; the loss is KL to
the final prediction (never pulling it) mixed with hard-label CE; exit layers and families that cannot work are
refused."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification

from distill.core.config import LossConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import LossInputs, LossSetup
from distill.losses.early_exit import (
    EarlyExitLoss,
    ExitHeads,
    check_exit_layers,
    exit_loss,
    final_head_linears,
    require_supported,
)
from tests.conftest import tiny_bert_config, tiny_causal_lm

IDS = torch.tensor([[2, 5, 9, 7, 3, 0], [2, 11, 6, 3, 0, 0]])
MASK = (IDS != 0).long()


@pytest.fixture
def bert():
    """Weights drawn wide enough that the logits depend on the input (at BERT's 0.02 they hardly do)."""
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(20, initializer_range=0.5)).eval()


def test_a_head_started_from_the_models_own_on_its_last_layer_gives_its_logits(bert):
    heads = ExitHeads([2, 4], "cls", bert.config.hidden_size, bert.config.num_labels)
    heads.start_from(*final_head_linears(bert))
    with torch.no_grad():
        out = bert(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
        exits = heads(out.hidden_states, MASK)
    assert len(exits) == 2 and exits[0].shape == out.logits.shape
    torch.testing.assert_close(exits[1], out.logits)
    assert (exits[0] - out.logits).abs().max() > 0.1  # layer 2 is not the last


def test_heads_reload_from_their_files(bert, tmp_path):
    torch.manual_seed(1)
    heads = ExitHeads([1, 3], "mean", 32, 2)
    for name, content in heads.to_files().items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    reloaded = ExitHeads.from_folder(tmp_path)
    assert (reloaded.layers, reloaded.pooling) == ([1, 3], "mean")
    states = [torch.randn(2, 6, 32) for _ in range(5)]
    for a, b in zip(heads(states, MASK), reloaded(states, MASK)):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="has no early-exit heads"):
        ExitHeads.from_folder(tmp_path / "elsewhere")


def test_the_loss_is_kl_to_the_final_prediction_mixed_with_ce_and_never_pulls_the_final_prediction():
    torch.manual_seed(0)
    exit_logits, final = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 1])
    assert exit_loss(final, final, labels, 2.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    mixed = exit_loss(exit_logits, final, labels, 2.0, 0.25)
    kl = F.kl_div(F.log_softmax(exit_logits / 2, -1), F.log_softmax(final / 2, -1), log_target=True,
                  reduction="batchmean") * 4
    torch.testing.assert_close(mixed, 0.75 * kl + 0.25 * F.cross_entropy(exit_logits, labels))
    mixed.backward()
    assert exit_logits.grad is not None and final.grad is None


def test_the_registered_loss_averages_its_exits_over_the_students_hidden_states(bert):
    loss = EarlyExitLoss(LossConfig(name="early_exit", exit_label_mix=0.0), LossSetup(bert.config, None, None))
    assert loss.heads.layers == [1, 2, 3]
    loss.attach(bert)
    out = bert(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    labels = torch.tensor([0, 1])
    value = loss(LossInputs(out, None, labels, MASK))
    expected = torch.stack([exit_loss(logits, out.logits, labels, 1.0, 0.0)
                            for logits in loss.heads(out.hidden_states, MASK)]).mean()
    assert value.item() > 0
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("layers, message", [([], "has no layer before the last"),
                                             ([0, 2, 4], r"exit_layers \[0, 4\] out of range")])
def test_exit_layers_that_cannot_work_are_refused(layers, message):
    with pytest.raises(ConfigError, match=message):
        check_exit_layers(layers, 4)
    check_exit_layers([1, 3], 4)


def test_decoders_are_refused():
    with pytest.raises(ConfigError, match="'llama' is not supported"):
        require_supported(tiny_causal_lm(20, tied=True).config)
