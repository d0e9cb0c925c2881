"""Paddle Inference runners (edge_shitu_converters.paddle_reference): a program run as a runtime session, checked
against the ONNX conversion of the same program run by onnxruntime (an independent implementation)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.paddle


def test_a_program_session_runs_the_program_until_closed(replica_dirs, replica_bundle):
    from edge_shitu.backends.onnxruntime import OnnxRuntimeSession
    from edge_shitu.bundle import Bundle
    from edge_shitu.errors import ClosedError
    from edge_shitu_converters.paddle_reference import ProgramSession

    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    session = ProgramSession(replica_dirs["extractor"])
    (name,), (out,) = session.input_names, session.output_names
    (features,) = session.run({name: x})
    onnx = OnnxRuntimeSession.from_file(Bundle.load(replica_bundle).require("extractor").path)
    (expected,) = onnx.run({onnx.input_names[0]: x})
    # paddle2onnx converts the extractor up to float rounding (docs: max abs diff ~3e-8).
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    (again,) = session.run({name: x}, [out])
    np.testing.assert_array_equal(again, features)
    session.close()
    session.close()
    with pytest.raises(ClosedError):
        session.run({name: x})
