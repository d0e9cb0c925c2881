package com.edgeshitu.demo

import android.content.Context
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.os.Handler
import android.os.Looper
import com.chaquo.python.PyObject
import com.chaquo.python.Python
import com.chaquo.python.android.AndroidPlatform
import org.json.JSONObject
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/** The answer of one call: the parsed JSON, or the one-line error the Python side (or the bridge) gave. */
class Reply(val json: JSONObject, val error: String?) {
    val ok: Boolean get() = error == null

    companion object {
        fun parse(text: String?): Reply {
            if (text == null) return failure("no answer from Python")
            val json = try {
                JSONObject(text)
            } catch (e: Exception) {
                return failure("unreadable answer from Python: ${text.take(80)}")
            }
            return Reply(json, if (json.has("error")) json.optString("error", "error") else null)
        }

        fun failure(message: String) = Reply(JSONObject().put("error", message), message)
    }
}

/**
 * The Kotlin side of `shitu_android.py` (app/src/main/python). One worker thread makes every Python call, in
 * order, off the main thread; callbacks come back on the main thread. Python itself is started lazily on that
 * worker, the first time it is needed.
 */
class ShituPython private constructor(context: Context) {
    private val app = context.applicationContext
    private val worker: ExecutorService = Executors.newSingleThreadExecutor { r -> Thread(r, "shitu-python") }
    private val main = Handler(Looper.getMainLooper())
    private var module: PyObject? = null  // touched only on the worker

    companion object {
        const val MODULE = "shitu_android"

        @Volatile private var instance: ShituPython? = null

        fun get(context: Context): ShituPython =
            instance ?: synchronized(this) { instance ?: ShituPython(context).also { instance = it } }
    }

    private fun module(): PyObject {
        module?.let { return it }
        if (!Python.isStarted()) Python.start(AndroidPlatform(app))
        return Python.getInstance().getModule(MODULE).also { module = it }
    }

    /** Run [work] on the worker; [done] gets its result (or its exception) on the main thread. */
    fun <T> submit(work: () -> T, done: (Result<T>) -> Unit) {
        worker.execute {
            val result = runCatching(work)
            main.post { done(result) }
        }
    }

    /** Call a JSON-answering function of the module. Java exceptions and Python exceptions both become errors. */
    private fun call(name: String, vararg args: Any?, done: (Reply) -> Unit) {
        submit({ module().callAttr(name, *args)?.toString() }) { result ->
            done(result.fold({ Reply.parse(it) }, { Reply.failure(oneLine(it)) }))
        }
    }

    private fun oneLine(t: Throwable): String =
        (t.message ?: t.javaClass.simpleName).lineSequence().firstOrNull { it.isNotBlank() }?.trim()
            ?: t.javaClass.simpleName

    /** Start Python and import the module ahead of the first real call (it takes a few seconds once). */
    fun warmUp(done: (Reply) -> Unit) {
        submit({ module(); Unit }) { r ->
            done(r.fold({ Reply(JSONObject(), null) }, { Reply.failure(oneLine(it)) }))
        }
    }

    fun open(bundlePath: String, galleryPath: String, threads: Int, done: (Reply) -> Unit) =
        call("open", bundlePath, galleryPath, threads, done = done)

    fun close(done: (Reply) -> Unit) = call("close", done = done)

    /** [rgb] is packed RGB as captured; [rotation] the clockwise degrees that make it upright. */
    fun recognizeRgb(rgb: ByteArray, width: Int, height: Int, rotation: Int, done: (Reply) -> Unit) =
        call("recognize_rgb", rgb, width, height, rotation, done = done)

    /** [boxJson] is `"[x1, y1, x2, y2]"` in the upright frame, or `""` for the detector's best box. */
    fun enrolRgb(
        rgb: ByteArray, width: Int, height: Int, rotation: Int, label: String, boxJson: String,
        done: (Reply) -> Unit,
    ) = call("enrol_rgb", rgb, width, height, rotation, label, boxJson, done = done)

    fun remove(itemId: Int, done: (Reply) -> Unit) = call("remove", itemId, done = done)

    fun relabel(itemId: Int, label: String, done: (Reply) -> Unit) = call("relabel", itemId, label, done = done)

    fun listItems(label: String, offset: Int, limit: Int, done: (Reply) -> Unit) =
        call("list_items", label, offset, limit, done = done)

    fun labels(done: (Reply) -> Unit) = call("labels", done = done)

    fun setMaxDistance(value: Int, done: (Reply) -> Unit) = call("set_max_distance", value, done = done)

    fun setMinSimilarity(value: Double, done: (Reply) -> Unit) = call("set_min_similarity", value, done = done)

    fun settings(done: (Reply) -> Unit) = call("settings", done = done)

    /** The item's thumbnail decoded, or null when it has none; `thumbnail()` answers bytes or None, not JSON. */
    fun thumbnail(itemId: Int, done: (Bitmap?) -> Unit) {
        submit({
            val jpeg = module().callAttr("thumbnail", itemId)?.toJava(ByteArray::class.java)
            jpeg?.let { BitmapFactory.decodeByteArray(it, 0, it.size) }
        }) { result -> done(result.getOrNull()) }
    }
}

/** The label names of a `labels()` answer, in its order, for the label field's suggestions. */
fun Reply.labelNames(): List<String> {
    val arr = json.optJSONArray("labels") ?: return emptyList()
    return (0 until arr.length()).mapNotNull { arr.optJSONObject(it)?.optString("label") }
}
