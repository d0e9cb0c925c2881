package com.edgeshitu.demo

import ai.onnxruntime.OnnxJavaType
import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.TensorInfo
import java.nio.FloatBuffer
import java.util.concurrent.atomic.AtomicBoolean

/**
 * One ONNX Runtime session, as the edge-shitu runtime's `android` backend calls it from Python through
 * Chaquopy (`edge_shitu/backends/android.py`). The contract is fixed by that module and by the bridge
 * simulator of tests/test_android.py: change neither side alone.
 *
 * Everything that crosses is a plain array: one float input (a flat `float[]` and its shape), every output
 * back as a flat `float[]` (row-major) with its shape, in [outputNames] order.
 */
class OrtBridge private constructor(private val session: OrtSession) : AutoCloseable {

    /** Outputs of one [run]: `data[i]` has shape `shapes[i]`; both in [outputNames] order. */
    class Outputs(@JvmField val data: Array<FloatArray>, @JvmField val shapes: Array<LongArray>)

    private val inputs: Array<String> = session.inputNames.toTypedArray()
    private val outputs: Array<String> = session.outputNames.toTypedArray()
    private val closed = AtomicBoolean(false)

    companion object {
        /** One environment per process, shared by every session (ORT's own singleton). */
        private val env: OrtEnvironment by lazy { OrtEnvironment.getEnvironment() }

        /** Load a model file; [threads] <= 0 leaves the intra-op thread count to ORT. */
        @JvmStatic
        fun fromFile(path: String, threads: Int): OrtBridge = withOptions(threads) { env.createSession(path, it) }

        /** Load a model from memory (a model of a one-file bundle); [threads] as in [fromFile]. */
        @JvmStatic
        fun fromBytes(model: ByteArray, threads: Int): OrtBridge = withOptions(threads) { env.createSession(model, it) }

        // The options are only needed while the session is created.
        private inline fun withOptions(threads: Int, create: (OrtSession.SessionOptions) -> OrtSession): OrtBridge {
            val opts = OrtSession.SessionOptions()
            try {
                if (threads > 0) opts.setIntraOpNumThreads(threads)
                // As the desktop runtime (edge_shitu/backends/onnxruntime.py SESSION_CONFIG): an idle worker that
                // spins takes the core the other model or the camera needs, and a bundle's float layers must not
                // have their weights rounded to int8 when the session loads.
                opts.addConfigEntry("session.intra_op.allow_spinning", "0")
                opts.addConfigEntry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
                return OrtBridge(create(opts))
            } finally {
                opts.close()
            }
        }
    }

    /** Input names in model order. */
    fun inputNames(): Array<String> = inputs.copyOf()

    /** Output names in model order. */
    fun outputNames(): Array<String> = outputs.copyOf()

    /** The declared shape of input [name]; -1 for a dynamic dimension. */
    fun inputShape(name: String): LongArray {
        val node = session.inputInfo[name]
            ?: throw IllegalArgumentException("no input '$name'; the model takes ${inputs.joinToString()}")
        val info = node.info as? TensorInfo
            ?: throw IllegalStateException("input '$name' is not a tensor (${node.info})")
        return info.shape
    }

    /** Run the model on one float input; returns every output, flattened row-major, with its shape. */
    fun run(name: String, data: FloatArray, shape: LongArray): Outputs {
        check(!closed.get()) { "this OrtBridge is closed" }
        require(name in inputs) { "no input '$name'; the model takes ${inputs.joinToString()}" }
        var count = 1L
        for (d in shape) {
            require(d >= 0) { "shape ${shape.contentToString()} has a negative dimension" }
            count = try {
                Math.multiplyExact(count, d)
            } catch (e: ArithmeticException) {
                throw IllegalArgumentException("shape ${shape.contentToString()} is too large")
            }
        }
        require(count == data.size.toLong()) {
            "input '$name': ${data.size} values for shape ${shape.contentToString()} ($count expected)"
        }

        val tensor = OnnxTensor.createTensor(env, FloatBuffer.wrap(data), shape)
        try {
            val result = session.run(mapOf(name to tensor))
            try {
                val tensors = Array(outputs.size) { i ->
                    val out = result.get(i) as? OnnxTensor
                        ?: throw IllegalStateException("output '${outputs[i]}' is not a tensor")
                    if (out.info.type != OnnxJavaType.FLOAT) {
                        throw IllegalStateException("output '${outputs[i]}' is ${out.info.type}, not float")
                    }
                    out
                }
                val outData = Array(tensors.size) { i ->
                    val buf = tensors[i].floatBuffer  // a copy, positioned at 0
                    FloatArray(buf.remaining()).also { buf.get(it) }
                }
                return Outputs(outData, Array(tensors.size) { i -> tensors[i].info.shape })
            } finally {
                result.close()
            }
        } finally {
            tensor.close()
        }
    }

    /** Release the session. Calling it twice is harmless. */
    override fun close() {
        if (closed.compareAndSet(false, true)) session.close()
    }
}
