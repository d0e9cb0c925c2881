package com.edgeshitu.demo

import android.content.Context
import android.graphics.Canvas
import android.graphics.DashPathEffect
import android.graphics.Paint
import android.graphics.RectF
import android.util.AttributeSet
import android.util.TypedValue
import android.view.View
import androidx.core.content.ContextCompat
import org.json.JSONArray
import org.json.JSONObject
import kotlin.math.max

/**
 * Draws recognition results over the camera preview. Boxes come in the coordinates of the upright analysed
 * frame and are mapped the way PreviewView's FILL_CENTER (and an ImageView's CENTER_CROP) maps the frame:
 * scaled to cover the view, centred, the overflow cropped. That holds when the preview and the analysis use
 * the same aspect ratio, which MainActivity asks CameraX for (4:3).
 *
 * Android draws the text, so labels in any script (Chinese included) render with the system fonts.
 */
class OverlayView @JvmOverloads constructor(
    context: Context, attrs: AttributeSet? = null,
) : View(context, attrs) {

    class Detection(
        val box: RectF,          // frame coordinates
        val label: String?,      // null: unknown
        val distance: Double?,   // Hamming distance of the best match, bits
        val similarity: Double?, // similarity of the best match (re-ranked search)
        val json: JSONArray,     // the box as Python gave it, for enrol_rgb
    )

    var detections: List<Detection> = emptyList()
        private set
    private var frameWidth = 0
    private var frameHeight = 0

    /** Whether the gallery accepts by similarity (shown as s=0.93) rather than by distance (d=41). */
    var similarityMode = false
        set(value) { field = value; invalidate() }

    /** Index into [detections] drawn highlighted, or -1. */
    var selected = -1
        set(value) { field = value; invalidate() }

    private fun dp(v: Float) = TypedValue.applyDimension(TypedValue.COMPLEX_UNIT_DIP, v, resources.displayMetrics)

    private val knownPaint = Paint(Paint.ANTI_ALIAS_FLAG).apply {
        style = Paint.Style.STROKE; strokeWidth = dp(3f)
        color = ContextCompat.getColor(context, R.color.box_known)
    }
    private val selectedPaint = Paint(knownPaint).apply { color = ContextCompat.getColor(context, R.color.box_selected) }
    private val unknownPaint = Paint(knownPaint).apply {
        color = ContextCompat.getColor(context, R.color.box_unknown)
        strokeWidth = dp(2f)
        pathEffect = DashPathEffect(floatArrayOf(dp(8f), dp(6f)), 0f)
    }
    private val textPaint = Paint(Paint.ANTI_ALIAS_FLAG).apply {
        color = 0xFFFFFFFF.toInt(); textSize = dp(15f)
    }
    private val textBackground = Paint().apply {
        color = ContextCompat.getColor(context, R.color.label_background)
    }
    private val scratch = RectF()

    /** Show the `results` of a recognize_rgb answer for an upright frame of [width] x [height]. */
    fun setResults(answer: JSONObject, width: Int, height: Int) {
        val results = answer.optJSONArray("results") ?: JSONArray()
        val list = ArrayList<Detection>(results.length())
        for (i in 0 until results.length()) {
            val r = results.optJSONObject(i) ?: continue
            val b = r.optJSONArray("box") ?: continue
            if (b.length() != 4) continue
            val label = if (r.isNull("label")) null else r.optString("label")
            val distance = if (r.isNull("distance")) null else r.optDouble("distance").takeIf { !it.isNaN() }
            val similarity = if (r.isNull("similarity")) null else r.optDouble("similarity").takeIf { !it.isNaN() }
            list += Detection(
                RectF(b.optDouble(0).toFloat(), b.optDouble(1).toFloat(), b.optDouble(2).toFloat(), b.optDouble(3).toFloat()),
                label, distance, similarity, b,
            )
        }
        detections = list
        frameWidth = width
        frameHeight = height
        selected = -1  // invalidates
    }

    fun clear() {
        detections = emptyList()
        selected = -1
    }

    // FILL_CENTER: one scale for both axes, large enough to cover the view.
    private fun scale() = if (frameWidth <= 0 || frameHeight <= 0) 0f
        else max(width.toFloat() / frameWidth, height.toFloat() / frameHeight)

    private fun toView(box: RectF, out: RectF): RectF {
        val s = scale()
        val dx = (width - frameWidth * s) / 2f
        val dy = (height - frameHeight * s) / 2f
        out.set(box.left * s + dx, box.top * s + dy, box.right * s + dx, box.bottom * s + dy)
        return out
    }

    /** The detection under view point ([x], [y]) (the smallest box when they nest), or -1. */
    fun hitTest(x: Float, y: Float): Int {
        if (scale() == 0f) return -1
        var best = -1
        var bestArea = Float.MAX_VALUE
        val slop = dp(8f)
        detections.forEachIndexed { i, d ->
            val r = toView(d.box, scratch)
            r.inset(-slop, -slop)
            if (r.contains(x, y)) {
                val area = r.width() * r.height()
                if (area < bestArea) { best = i; bestArea = area }
            }
        }
        return best
    }

    override fun onDraw(canvas: Canvas) {
        super.onDraw(canvas)
        if (scale() == 0f) return
        val pad = dp(4f)
        val fm = textPaint.fontMetrics
        detections.forEachIndexed { i, d ->
            val r = toView(d.box, scratch)
            val paint = when {
                i == selected -> selectedPaint
                d.label == null -> unknownPaint
                else -> knownPaint
            }
            canvas.drawRect(r, paint)
            val closeness = if (similarityMode) d.similarity?.let { "  s=" + String.format("%.2f", it) }
                else d.distance?.let { "  d=${it.toInt()}" }
            val text = (d.label ?: context.getString(R.string.unknown)) + (closeness ?: "")
            val tw = textPaint.measureText(text)
            val th = fm.descent - fm.ascent
            // Above the box when there is room, else inside its top edge.
            val top = if (r.top - th - 2 * pad >= 0f) r.top - th - 2 * pad else r.top
            val left = r.left.coerceIn(0f, max(0f, width - tw - 2 * pad))
            canvas.drawRect(left, top, left + tw + 2 * pad, top + th + 2 * pad, textBackground)
            canvas.drawText(text, left + pad, top + pad - fm.ascent, textPaint)
        }
    }
}
