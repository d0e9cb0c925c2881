package com.edgeshitu.demo

import android.Manifest
import android.content.Context
import android.content.Intent
import android.content.pm.PackageManager
import android.graphics.Bitmap
import android.graphics.Matrix
import android.net.Uri
import android.os.Bundle
import android.os.SystemClock
import android.provider.OpenableColumns
import android.util.Size
import android.view.LayoutInflater
import android.view.MotionEvent
import android.view.View
import android.widget.ArrayAdapter
import android.widget.SeekBar
import android.widget.Toast
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AlertDialog
import androidx.appcompat.app.AppCompatActivity
import androidx.camera.core.CameraSelector
import androidx.camera.core.ImageAnalysis
import androidx.camera.core.ImageProxy
import androidx.camera.core.Preview
import androidx.camera.core.resolutionselector.AspectRatioStrategy
import androidx.camera.core.resolutionselector.ResolutionSelector
import androidx.camera.core.resolutionselector.ResolutionStrategy
import androidx.camera.lifecycle.ProcessCameraProvider
import androidx.core.content.ContextCompat
import com.edgeshitu.demo.databinding.ActivityMainBinding
import com.edgeshitu.demo.databinding.DialogLabelBinding
import com.google.android.material.snackbar.Snackbar
import org.json.JSONObject
import java.io.File
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean

/**
 * The camera screen: live recognition of every object in view, and enrolment of new ones.
 *
 * Frames go to Python as packed RGB with CameraX's rotation (Python turns them upright); boxes come back in
 * the upright frame. At most one recognition is in flight: frames that arrive meanwhile are dropped.
 */
class MainActivity : AppCompatActivity() {

    /** One analysed frame as sent to Python, and what Python answered for it. */
    private class Frame(val rgb: ByteArray, val width: Int, val height: Int, val rotation: Int) {
        val uprightWidth get() = if (rotation % 180 == 0) width else height
        val uprightHeight get() = if (rotation % 180 == 0) height else width
    }

    private lateinit var binding: ActivityMainBinding
    private lateinit var shitu: ShituPython
    private lateinit var analysisExecutor: ExecutorService
    private val prefs by lazy { getSharedPreferences("edge_shitu", Context.MODE_PRIVATE) }

    private val busy = AtomicBoolean(false)   // a recognize_rgb call is in flight
    @Volatile private var ready = false       // a bundle is open
    @Volatile private var frozen = false      // showing a still frame for enrolment
    private var shown: Frame? = null          // the frame whose results the overlay shows (main thread)
    private var bits = 0
    private var similarityMode = false

    private val galleryPath: String
        get() = prefs.getString(KEY_GALLERY, null) ?: File(filesDir, "gallery.db").path
    private val bundlePath: String?
        get() = prefs.getString(KEY_BUNDLE, null)?.takeIf { File(it).exists() }

    companion object {
        private const val KEY_BUNDLE = "bundle_path"
        private const val KEY_GALLERY = "gallery_path"
        private val ANALYSIS_SIZE = Size(640, 480)
    }

    private val cameraPermission =
        registerForActivityResult(ActivityResultContracts.RequestPermission()) { granted ->
            if (granted) startCamera() else binding.status.setText(R.string.camera_denied)
        }

    // Storage Access Framework. A .esb file has no MIME type of its own, so any file may be picked.
    private val pickBundle =
        registerForActivityResult(ActivityResultContracts.OpenDocument()) { uri -> uri?.let(::importBundle) }
    private val pickGallery =
        registerForActivityResult(ActivityResultContracts.OpenDocument()) { uri -> uri?.let(::importGallery) }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        binding = ActivityMainBinding.inflate(layoutInflater)
        setContentView(binding.root)
        shitu = ShituPython.get(this)
        analysisExecutor = Executors.newSingleThreadExecutor()

        binding.btnGallery.setOnClickListener { startActivity(Intent(this, GalleryActivity::class.java)) }
        binding.btnImportBundle.setOnClickListener { pickBundle.launch(arrayOf("*/*")) }
        binding.btnImportGallery.setOnClickListener { pickGallery.launch(arrayOf("*/*")) }
        binding.btnPhoto.setOnClickListener { if (frozen) unfreeze() else photo() }
        binding.overlay.setOnTouchListener { v, event ->
            if (event.action == MotionEvent.ACTION_UP) {
                v.performClick()
                onTap(event.x, event.y)
            }
            true
        }
        // One slider for the gallery's acceptance rule: a radius in bits, or (a gallery with compact features)
        // a minimum similarity in [-1, 1], in steps of 0.01.
        binding.radius.setOnSeekBarChangeListener(object : SeekBar.OnSeekBarChangeListener {
            override fun onProgressChanged(bar: SeekBar, progress: Int, fromUser: Boolean) {
                if (fromUser) showThreshold(progress)
            }
            override fun onStartTrackingTouch(bar: SeekBar) {}
            override fun onStopTrackingTouch(bar: SeekBar) {
                val done = { r: Reply -> if (r.ok) showSettings(r.json) else showError(r.error) }
                if (similarityMode) shitu.setMinSimilarity(similarityOf(bar.progress), done)
                else shitu.setMaxDistance(bar.progress, done)
            }
        })

        binding.status.setText(R.string.starting)
        shitu.warmUp { r -> if (r.ok) openCurrent() else showError(r.error) }

        if (ContextCompat.checkSelfPermission(this, Manifest.permission.CAMERA) == PackageManager.PERMISSION_GRANTED) {
            startCamera()
        } else {
            cameraPermission.launch(Manifest.permission.CAMERA)
        }
    }

    override fun onResume() {
        super.onResume()
        // Back from the gallery: counts and labels may have changed.
        if (ready) shitu.settings { r -> if (r.ok) showSettings(r.json) }
    }

    override fun onDestroy() {
        super.onDestroy()
        analysisExecutor.shutdown()
        // Python (and the open bundle) live as long as the process; the next onCreate reuses them.
    }

    // ---- bundle and gallery -------------------------------------------------------------------------------

    private fun threads() = Runtime.getRuntime().availableProcessors().coerceIn(1, 4)

    private fun openCurrent() {
        val bundle = bundlePath
        if (bundle == null) {
            ready = false
            binding.status.setText(R.string.no_bundle)
            return
        }
        binding.status.setText(R.string.opening)
        shitu.open(bundle, galleryPath, threads()) { r ->
            if (r.ok) onOpened(r.json) else { ready = false; showError(r.error) }
        }
    }

    private fun onOpened(summary: JSONObject) {
        bits = summary.optInt("bits")
        ready = true
        binding.radius.isEnabled = true
        showSettings(summary)
        binding.status.text = getString(
            R.string.status_open, bits, summary.optInt("items"), summary.optInt("labels"),
        )
    }

    private fun similarityOf(progress: Int) = progress / 100.0 - 1.0

    private fun showThreshold(progress: Int) {
        binding.radiusLabel.text = if (similarityMode) getString(R.string.similarity_label, similarityOf(progress))
            else getString(R.string.radius_label, progress)
    }

    private fun showSettings(s: JSONObject) {
        if (s.has("bits")) bits = s.optInt("bits", bits)
        if (s.has("mode")) similarityMode = s.optString("mode") == "similarity"
        binding.overlay.similarityMode = similarityMode
        val progress = if (similarityMode) {
            binding.radius.max = 200
            Math.round((s.optDouble("min_similarity", similarityOf(binding.radius.progress)) + 1.0) * 100).toInt()
        } else {
            binding.radius.max = bits
            s.optInt("max_distance", binding.radius.progress)
        }
        binding.radius.progress = progress
        showThreshold(progress)
    }

    private fun importBundle(uri: Uri): Unit = importFile(uri, "bundle", ".esb") { file ->
        val old = prefs.getString(KEY_BUNDLE, null)
        shitu.open(file.path, galleryPath, threads()) { r ->
            if (r.ok) {
                prefs.edit().putString(KEY_BUNDLE, file.path).apply()
                if (old != null && old != file.path) File(old).delete()
                toast(getString(R.string.imported, displayName(uri)))
                onOpened(r.json)
            } else {
                file.delete()
                showError(r.error)
                openCurrent()  // back to what was open before, if anything
            }
        }
    }

    /** The imported gallery becomes the current one; the previous gallery file stays where it was. */
    private fun importGallery(uri: Uri): Unit = importFile(uri, "gallery", ".db") { file ->
        val bundle = bundlePath
        if (bundle == null) {
            prefs.edit().putString(KEY_GALLERY, file.path).apply()
            toast(getString(R.string.imported, displayName(uri)))
            binding.status.setText(R.string.no_bundle)
            return@importFile
        }
        shitu.open(bundle, file.path, threads()) { r ->
            if (r.ok) {
                prefs.edit().putString(KEY_GALLERY, file.path).apply()
                toast(getString(R.string.imported, displayName(uri)))
                onOpened(r.json)
            } else {
                file.delete()
                showError(r.error)
                openCurrent()
            }
        }
    }

    /** Copy a picked document into filesDir under a fresh name (never over a file Python has open). */
    private fun importFile(uri: Uri, stem: String, ext: String, then: (File) -> Unit) {
        ready = false
        binding.overlay.clear()
        binding.status.text = getString(R.string.copying, displayName(uri))
        val target = File(filesDir, "$stem-${System.currentTimeMillis()}$ext")
        val resolver = contentResolver
        shitu.submit({
            val input = resolver.openInputStream(uri) ?: error("cannot read ${uri.lastPathSegment}")
            input.use { src -> target.outputStream().use { dst -> src.copyTo(dst, 1 shl 16) } }
            target
        }) { result ->
            result.fold(then) { e ->
                target.delete()
                showError(e.message ?: e.javaClass.simpleName)
                openCurrent()
            }
        }
    }

    private fun displayName(uri: Uri): String =
        contentResolver.query(uri, arrayOf(OpenableColumns.DISPLAY_NAME), null, null, null)?.use { c ->
            if (c.moveToFirst()) c.getString(0) else null
        } ?: uri.lastPathSegment ?: uri.toString()

    // ---- camera and recognition ---------------------------------------------------------------------------

    private fun startCamera() {
        val future = ProcessCameraProvider.getInstance(this)
        future.addListener({
            val provider = future.get()
            // Preview and analysis share 4:3 so that the overlay's FILL_CENTER mapping matches the preview.
            val ratio = AspectRatioStrategy.RATIO_4_3_FALLBACK_AUTO_STRATEGY
            val preview = Preview.Builder()
                .setResolutionSelector(ResolutionSelector.Builder().setAspectRatioStrategy(ratio).build())
                .build()
                .also { it.setSurfaceProvider(binding.preview.surfaceProvider) }
            val analysis = ImageAnalysis.Builder()
                .setOutputImageFormat(ImageAnalysis.OUTPUT_IMAGE_FORMAT_RGBA_8888)
                .setBackpressureStrategy(ImageAnalysis.STRATEGY_KEEP_ONLY_LATEST)
                .setResolutionSelector(
                    ResolutionSelector.Builder()
                        .setAspectRatioStrategy(ratio)
                        .setResolutionStrategy(
                            ResolutionStrategy(ANALYSIS_SIZE, ResolutionStrategy.FALLBACK_RULE_CLOSEST_HIGHER_THEN_LOWER),
                        )
                        .build(),
                )
                .build()
                .also { it.setAnalyzer(analysisExecutor) { image -> analyze(image) } }
            try {
                provider.unbindAll()
                provider.bindToLifecycle(this, CameraSelector.DEFAULT_BACK_CAMERA, preview, analysis)
            } catch (e: Exception) {
                showError(e.message ?: e.javaClass.simpleName)
            }
        }, ContextCompat.getMainExecutor(this))
    }

    /** On the analysis thread. Drops the frame unless a bundle is open, the view is live and Python is idle. */
    private fun analyze(image: ImageProxy) {
        if (!ready || frozen || !busy.compareAndSet(false, true)) {
            image.close()
            return
        }
        val frame = try {
            Frame(rgbaToRgb(image), image.width, image.height, image.imageInfo.rotationDegrees)
        } catch (e: Exception) {
            busy.set(false)
            return
        } finally {
            image.close()
        }
        val started = SystemClock.elapsedRealtime()
        shitu.recognizeRgb(frame.rgb, frame.width, frame.height, frame.rotation) { r ->
            busy.set(false)
            if (isDestroyed || frozen) return@recognizeRgb
            if (!r.ok) {
                binding.status.text = getString(R.string.error, r.error)
                return@recognizeRgb
            }
            shown = frame
            binding.overlay.setResults(
                r.json, r.json.optInt("width", frame.uprightWidth), r.json.optInt("height", frame.uprightHeight),
            )
            binding.status.text = getString(
                R.string.status_timing, binding.overlay.detections.size,
                (SystemClock.elapsedRealtime() - started).toDouble(),
            )
        }
    }

    /** The RGBA_8888 plane -> packed RGB, honouring the row and pixel strides (rows may be padded). */
    private fun rgbaToRgb(image: ImageProxy): ByteArray {
        val plane = image.planes[0]
        val buf = plane.buffer.duplicate()
        val w = image.width
        val h = image.height
        val rowStride = plane.rowStride
        val pixelStride = plane.pixelStride
        val out = ByteArray(w * h * 3)
        val row = ByteArray(rowStride)
        var o = 0
        for (y in 0 until h) {
            buf.position(y * rowStride)
            buf.get(row, 0, minOf(rowStride, buf.remaining()))
            var i = 0
            for (x in 0 until w) {
                out[o] = row[i]; out[o + 1] = row[i + 1]; out[o + 2] = row[i + 2]
                o += 3
                i += pixelStride
            }
        }
        return out
    }

    // ---- enrolment ----------------------------------------------------------------------------------------

    private fun freeze(): Frame? {
        val frame = shown ?: return null
        frozen = true
        binding.frozen.setImageBitmap(uprightBitmap(frame))
        binding.frozen.visibility = View.VISIBLE
        binding.btnPhoto.setText(R.string.btn_live)
        return frame
    }

    private fun unfreeze() {
        frozen = false
        binding.frozen.visibility = View.GONE
        binding.frozen.setImageDrawable(null)
        binding.overlay.selected = -1
        binding.btnPhoto.setText(R.string.btn_photo)
    }

    /** Photo: freeze the current frame and offer to enrol the whole of it; boxes can then be tapped. */
    private fun photo() {
        if (!ready) { binding.status.setText(R.string.no_bundle); return }
        val frame = freeze() ?: return
        toast(getString(R.string.frozen_hint))
        askLabel(frame, -1)
    }

    private fun onTap(x: Float, y: Float) {
        if (!ready) return
        val hit = binding.overlay.hitTest(x, y)
        if (hit < 0) return
        val frame = if (frozen) shown else freeze()
        if (frame == null) return
        binding.overlay.selected = hit
        askLabel(frame, hit)
    }

    /** The label dialog; [index] is the tapped detection, or -1 for the whole frame. */
    private fun askLabel(frame: Frame, index: Int) {
        val dialogBinding = DialogLabelBinding.inflate(LayoutInflater.from(this))
        dialogBinding.message.setText(if (index < 0) R.string.enrol_whole else R.string.enrol_box)
        val detection = binding.overlay.detections.getOrNull(index)
        detection?.label?.let { dialogBinding.label.setText(it) }
        shitu.labels { r ->
            if (r.ok) {
                dialogBinding.label.setAdapter(
                    ArrayAdapter(this, android.R.layout.simple_dropdown_item_1line, r.labelNames()),
                )
            }
        }
        val dialog = AlertDialog.Builder(this)
            .setTitle(R.string.enrol_title)
            .setView(dialogBinding.root)
            .setPositiveButton(R.string.add, null)  // set below, so that an empty label keeps the dialog open
            .setNegativeButton(R.string.cancel) { _, _ -> binding.overlay.selected = -1 }
            .create()
        dialog.setOnShowListener {
            dialog.getButton(AlertDialog.BUTTON_POSITIVE).setOnClickListener {
                val label = dialogBinding.label.text.toString().trim()
                if (label.isEmpty()) {
                    dialogBinding.label.error = getString(R.string.label_empty)
                } else {
                    dialog.dismiss()
                    enrol(frame, label, detection?.json?.toString() ?: "")
                }
            }
        }
        dialog.show()
    }

    private fun enrol(frame: Frame, label: String, boxJson: String) {
        shitu.enrolRgb(frame.rgb, frame.width, frame.height, frame.rotation, label, boxJson) { r ->
            if (isDestroyed) return@enrolRgb
            if (!r.ok) { showError(r.error); return@enrolRgb }
            val id = r.json.optInt("id", -1)
            unfreeze()
            Snackbar.make(binding.root, getString(R.string.added, id, r.json.optString("label", label)), Snackbar.LENGTH_LONG)
                .setAnchorView(binding.bottomBar)
                .setAction(R.string.undo) {
                    shitu.remove(id) { u ->
                        if (u.ok) toast(getString(R.string.removed, id)) else showError(u.error)
                    }
                }
                .show()
            shitu.settings { s -> if (s.ok) showSettings(s.json) }
        }
    }

    /** The frame as the user saw it: RGB -> ARGB bitmap, turned upright. */
    private fun uprightBitmap(frame: Frame): Bitmap {
        val pixels = IntArray(frame.width * frame.height)
        val rgb = frame.rgb
        for (i in pixels.indices) {
            val j = i * 3
            pixels[i] = (0xFF shl 24) or ((rgb[j].toInt() and 0xFF) shl 16) or
                ((rgb[j + 1].toInt() and 0xFF) shl 8) or (rgb[j + 2].toInt() and 0xFF)
        }
        val bmp = Bitmap.createBitmap(pixels, frame.width, frame.height, Bitmap.Config.ARGB_8888)
        if (frame.rotation == 0) return bmp
        val m = Matrix().apply { postRotate(frame.rotation.toFloat()) }
        return Bitmap.createBitmap(bmp, 0, 0, bmp.width, bmp.height, m, true)
    }

    // ---- messages -----------------------------------------------------------------------------------------

    private fun showError(message: String?) {
        if (isDestroyed) return
        val text = getString(R.string.error, message ?: "?")
        binding.status.text = text
        toast(text)
    }

    private fun toast(text: String) = Toast.makeText(this, text, Toast.LENGTH_LONG).show()
}
