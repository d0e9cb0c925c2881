package com.edgeshitu.demo

import android.graphics.Bitmap
import android.os.Bundle
import android.util.LruCache
import android.view.LayoutInflater
import android.view.View
import android.view.ViewGroup
import android.widget.AdapterView
import android.widget.ArrayAdapter
import android.widget.Toast
import androidx.appcompat.app.AlertDialog
import androidx.appcompat.app.AppCompatActivity
import androidx.recyclerview.widget.GridLayoutManager
import androidx.recyclerview.widget.RecyclerView
import com.edgeshitu.demo.databinding.ActivityGalleryBinding
import com.edgeshitu.demo.databinding.DialogLabelBinding
import com.edgeshitu.demo.databinding.ItemGalleryBinding
import org.json.JSONObject

/**
 * The gallery on the phone: a grid of enrolled items with their thumbnails, filtered by label (the spinner
 * lists every label with its count). Long-press an item to relabel or delete it.
 */
class GalleryActivity : AppCompatActivity() {

    private class Item(val id: Int, var label: String, val hasThumbnail: Boolean)
    private class LabelCount(val label: String, val count: Int)

    private lateinit var binding: ActivityGalleryBinding
    private lateinit var shitu: ShituPython
    private val items = ArrayList<Item>()
    private val adapter = ItemAdapter()
    private var labels: List<LabelCount> = emptyList()
    private var filter = ""          // "" = all labels
    private var total = 0
    private var loading = false
    private var generation = 0       // bumped on every reload, so that late pages of an old query are ignored
    private val thumbnails = object : LruCache<Int, Bitmap>(8 * 1024 * 1024) {
        override fun sizeOf(key: Int, value: Bitmap) = value.byteCount
    }

    companion object {
        private const val PAGE = 60
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        binding = ActivityGalleryBinding.inflate(layoutInflater)
        setContentView(binding.root)
        setSupportActionBar(binding.toolbar)
        supportActionBar?.setDisplayHomeAsUpEnabled(true)
        shitu = ShituPython.get(this)

        val layout = GridLayoutManager(this, 3)
        binding.grid.layoutManager = layout
        binding.grid.adapter = adapter
        binding.grid.addOnScrollListener(object : RecyclerView.OnScrollListener() {
            override fun onScrolled(rv: RecyclerView, dx: Int, dy: Int) {
                if (layout.findLastVisibleItemPosition() >= items.size - PAGE / 3) loadMore()
            }
        })
        binding.labelFilter.onItemSelectedListener = object : AdapterView.OnItemSelectedListener {
            override fun onItemSelected(parent: AdapterView<*>, view: View?, position: Int, id: Long) {
                val wanted = if (position == 0) "" else labels.getOrNull(position - 1)?.label ?: ""
                if (wanted != filter) { filter = wanted; reload() }
            }
            override fun onNothingSelected(parent: AdapterView<*>) {}
        }
        refreshLabels()
        reload()
    }

    override fun onSupportNavigateUp(): Boolean {
        finish()
        return true
    }

    // ---- data ---------------------------------------------------------------------------------------------

    private fun refreshLabels() {
        shitu.labels { r ->
            if (isDestroyed) return@labels
            if (!r.ok) { toast(r.error); return@labels }
            val arr = r.json.optJSONArray("labels")
            labels = (0 until (arr?.length() ?: 0)).mapNotNull { i ->
                arr?.optJSONObject(i)?.let { LabelCount(it.optString("label"), it.optInt("count")) }
            }
            val all = labels.sumOf { it.count }
            val names = listOf(getString(R.string.label_count, getString(R.string.all_labels), all)) +
                labels.map { getString(R.string.label_count, it.label, it.count) }
            binding.labelFilter.adapter =
                ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, names)
            // Keep the current filter selected if its label still exists, else show all.
            val index = labels.indexOfFirst { it.label == filter }
            binding.labelFilter.setSelection(if (index >= 0) index + 1 else 0, false)
            if (index < 0 && filter.isNotEmpty()) { filter = ""; reload() }
        }
    }

    private fun reload() {
        generation++
        items.clear()
        total = 0
        loading = false
        adapter.notifyDataSetChanged()
        loadMore(force = true)
    }

    private fun loadMore(force: Boolean = false) {
        if (loading || (!force && items.size >= total)) return
        loading = true
        val gen = generation
        shitu.listItems(filter, items.size, PAGE) { r ->
            if (isDestroyed || gen != generation) return@listItems
            loading = false
            if (!r.ok) { toast(r.error); return@listItems }
            total = r.json.optInt("total")
            val page = r.json.optJSONArray("items")
            val start = items.size
            for (i in 0 until (page?.length() ?: 0)) {
                val o: JSONObject = page?.optJSONObject(i) ?: continue
                items += Item(o.optInt("id"), o.optString("label"), o.optBoolean("has_thumbnail"))
            }
            adapter.notifyItemRangeInserted(start, items.size - start)
            binding.count.text = getString(R.string.gallery_count, total)
            binding.empty.visibility = if (total == 0) View.VISIBLE else View.GONE
        }
    }

    // ---- actions ------------------------------------------------------------------------------------------

    private fun onLongPress(item: Item) {
        AlertDialog.Builder(this)
            .setTitle(getString(R.string.item_actions, item.id))
            .setItems(arrayOf(getString(R.string.relabel), getString(R.string.delete))) { _, which ->
                if (which == 0) relabel(item) else confirmDelete(item)
            }
            .show()
    }

    private fun relabel(item: Item) {
        val dialogBinding = DialogLabelBinding.inflate(LayoutInflater.from(this))
        dialogBinding.message.text = getString(R.string.item_title, item.id, item.label)
        dialogBinding.label.setText(item.label)
        dialogBinding.label.setAdapter(
            ArrayAdapter(this, android.R.layout.simple_dropdown_item_1line, labels.map { it.label }),
        )
        AlertDialog.Builder(this)
            .setTitle(R.string.relabel)
            .setView(dialogBinding.root)
            .setPositiveButton(R.string.relabel) { _, _ ->
                val label = dialogBinding.label.text.toString().trim()
                if (label.isEmpty() || label == item.label) return@setPositiveButton
                shitu.relabel(item.id, label) done@{ r ->
                    if (isDestroyed) return@done
                    if (!r.ok) { toast(r.error); return@done }
                    refreshLabels()
                    if (filter.isEmpty()) {
                        item.label = r.json.optString("label", label)
                        adapter.notifyItemChanged(items.indexOf(item))
                    } else {
                        reload()  // it left the filtered label
                    }
                }
            }
            .setNegativeButton(R.string.cancel, null)
            .show()
    }

    private fun confirmDelete(item: Item) {
        AlertDialog.Builder(this)
            .setMessage(getString(R.string.delete_confirm, item.id, item.label))
            .setPositiveButton(R.string.delete) { _, _ ->
                shitu.remove(item.id) { r ->
                    if (isDestroyed) return@remove
                    if (!r.ok) { toast(r.error); return@remove }
                    val pos = items.indexOf(item)
                    if (pos >= 0) {
                        items.removeAt(pos)
                        adapter.notifyItemRemoved(pos)
                    }
                    total = (total - 1).coerceAtLeast(0)
                    thumbnails.remove(item.id)
                    binding.count.text = getString(R.string.gallery_count, total)
                    binding.empty.visibility = if (total == 0) View.VISIBLE else View.GONE
                    refreshLabels()
                }
            }
            .setNegativeButton(R.string.cancel, null)
            .show()
    }

    private fun toast(text: String?) = Toast.makeText(this, getString(R.string.error, text ?: "?"), Toast.LENGTH_LONG).show()

    // ---- grid ---------------------------------------------------------------------------------------------

    private class Holder(val b: ItemGalleryBinding) : RecyclerView.ViewHolder(b.root)

    private inner class ItemAdapter : RecyclerView.Adapter<Holder>() {
        override fun getItemCount() = items.size

        override fun onCreateViewHolder(parent: ViewGroup, viewType: Int) =
            Holder(ItemGalleryBinding.inflate(LayoutInflater.from(parent.context), parent, false))

        override fun onBindViewHolder(holder: Holder, position: Int) {
            val item = items[position]
            holder.b.caption.text = getString(R.string.item_title, item.id, item.label)
            holder.b.root.setOnLongClickListener { onLongPress(item); true }
            holder.b.thumb.tag = item.id
            val cached = thumbnails.get(item.id)
            holder.b.thumb.setImageBitmap(cached)
            if (cached == null && item.hasThumbnail) {
                shitu.thumbnail(item.id) { bmp ->
                    if (bmp == null || isDestroyed) return@thumbnail
                    thumbnails.put(item.id, bmp)
                    // The view may have been recycled for another item meanwhile.
                    if (holder.b.thumb.tag == item.id) holder.b.thumb.setImageBitmap(bmp)
                }
            }
        }
    }
}
