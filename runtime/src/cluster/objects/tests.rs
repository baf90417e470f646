use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::writer::FileWriter;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::FlightData;
use futures::TryStreamExt;

use super::flight::{parse_ticket, ticket};
use super::ipc_file::{file_batch_messages, map_shared_file};
use super::store::{read_file, read_file_batch, write_file};
use super::transfer::{batch_rows, flight_encoder, for_flight, regroup, FLIGHT_VIEW_ROWS};
use super::*;
use arrow::array::Int64Array;

fn batch(n: i64) -> RecordBatch {
    RecordBatch::try_from_iter([(
        "x",
        Arc::new(Int64Array::from_iter_values(0..n)) as arrow::array::ArrayRef,
    )])
    .unwrap()
}

fn write_ipc(path: &Path, batches: &[RecordBatch]) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = FileWriter::try_new(file, &batches[0].schema()).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

/// Files handed over in the shared folder are objects: counted as memory, found by
/// `locate`, spilled to disk (and out of the folder) beyond the limit, removed when
/// freed; a name leading out of the folder is refused.
#[test]
fn files_in_the_shared_folder_are_objects_that_spill_and_free() {
    let spill = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let one = vec![batch(10_000)];
    write_ipc(&shared.path().join("a.arrow"), &one);
    let size = std::fs::metadata(shared.path().join("a.arrow"))
        .unwrap()
        .len();
    let store = ObjectStore::new(size * 3 / 2, spill.path().to_path_buf())
        .with_shared_dir(shared.path().to_path_buf());
    assert_eq!(store.adopt("o1", "a.arrow").unwrap(), size);
    assert_eq!(store.usage(), (size, 0));
    assert_eq!(store.locate("o1"), Some(shared.path().join("a.arrow")));
    write_ipc(&shared.path().join("b.arrow"), &one);
    store.adopt("o2", "b.arrow").unwrap();
    // o1 went to disk: out of the shared folder, still readable.
    assert_eq!(store.usage(), (size, size));
    assert_eq!(store.locate("o1"), None);
    assert!(!shared.path().join("a.arrow").exists());
    assert_eq!(*store.get("o1").unwrap().unwrap(), one);
    assert_eq!(*store.get("o2").unwrap().unwrap(), one);
    store.free(&["o2".to_string()]);
    assert!(!shared.path().join("b.arrow").exists());
    assert_eq!(store.usage().0, 0);
    assert!(store.adopt("o3", "../a.arrow").is_err());
    assert!(store.adopt("o3", "missing.arrow").is_err());
}

#[test]
fn one_batch_of_an_object_is_read_alone_in_memory_and_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let parts = vec![batch(3), batch(0), batch(7)];
    let one = batches_size(&parts);
    // Room for one such object: the first spills when the second comes.
    let store = ObjectStore::new(one * 3 / 2, dir.path().to_path_buf());
    store.put("spilled", parts.clone()).unwrap();
    store.put("memory", parts.clone()).unwrap();
    store.put("empty", vec![]).unwrap();
    assert!(store.usage().1 > 0, "the first object spilled");
    for id in ["spilled", "memory"] {
        for (i, want) in parts.iter().enumerate() {
            let got = store.get_batch(id, i as u32).unwrap().unwrap();
            assert_eq!(got, vec![want.clone()], "{id} batch {i}");
        }
        let err = store.get_batch(id, 3).unwrap_err().to_string();
        assert!(err.contains("3 batches") && err.contains(id), "{err}");
    }
    // An object without batches has no rows in any partition.
    assert_eq!(store.get_batch("empty", 5).unwrap().unwrap(), vec![]);
    assert!(store.get_batch("absent", 0).unwrap().is_none());
    let all = parts.clone();
    assert_eq!(
        Selection::Batch(2).apply("o", all.clone()).unwrap(),
        vec![parts[2].clone()]
    );
    assert_eq!(
        Selection::Rows { offset: 2, rows: 4 }
            .apply("o", all)
            .unwrap()
            .iter()
            .map(RecordBatch::num_rows)
            .collect::<Vec<_>>(),
        vec![1, 3]
    );
}

#[test]
fn view_columns_keep_only_their_rows_strings() {
    use arrow::array::StringViewArray;
    let long: Vec<String> = (0..40_000)
        .map(|i| format!("a string longer than twelve {i}"))
        .collect();
    let strings = StringViewArray::from_iter_values(long.iter());
    let b =
        RecordBatch::try_from_iter([("s", Arc::new(strings) as arrow::array::ArrayRef)]).unwrap();
    let held = |b: &RecordBatch| -> usize {
        use arrow::array::AsArray;
        b.column(0)
            .as_string_view()
            .data_buffers()
            .iter()
            .map(|d| d.len())
            .sum()
    };
    let whole = held(&b);
    // A slice of ten rows still holds every string; its own copy holds its ten.
    let slice = b.slice(10, 10);
    assert_eq!(held(&slice), whole);
    let own = volley_common::compact_bloated_views(slice.clone()).unwrap();
    assert!(held(&own) * 50 < whole, "{} of {whole}", held(&own));
    assert_eq!(own, slice);
    // A compact batch is passed on as it is.
    assert_eq!(
        held(&volley_common::compact_bloated_views(b.clone()).unwrap()),
        whole
    );
    // Over Flight: pieces of at most FLIGHT_VIEW_ROWS rows owning their strings.
    let pieces = for_flight(vec![b.clone()]).unwrap();
    let sizes: Vec<usize> = pieces.iter().map(RecordBatch::num_rows).collect();
    assert_eq!(
        sizes,
        vec![
            FLIGHT_VIEW_ROWS,
            FLIGHT_VIEW_ROWS,
            40_000 - 2 * FLIGHT_VIEW_ROWS
        ]
    );
    assert!(pieces.iter().all(|p| held(p) * 2 < whole));
    assert_eq!(
        arrow::compute::concat_batches(&b.schema(), &pieces).unwrap(),
        b
    );
}

/// A batch read from an IPC file (one body every column slices, a view column
/// among them) goes over Flight as messages of about its own size in all.
#[test]
fn a_batch_read_from_a_file_goes_over_flight_at_its_size() {
    use arrow::array::{ArrayRef, Int64Array, StringViewArray};
    let n = 200_000;
    let mut columns: Vec<(String, ArrayRef)> = (0..12)
        .map(|c| {
            (
                format!("i{c}"),
                Arc::new(Int64Array::from_iter_values(0..n)) as ArrayRef,
            )
        })
        .collect();
    columns.push((
        "s".into(),
        Arc::new(StringViewArray::from_iter_values(
            (0..n).map(|i| format!("a comment of some forty bytes, row {i}")),
        )),
    ));
    let b = RecordBatch::try_from_iter(columns).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.arrow");
    write_file(&path, std::slice::from_ref(&b), ObjectCompression::None).unwrap();
    let read = read_file_batch(&path, 0).unwrap();
    let size = volley_common::batch_memory(&read[0]);
    let pieces = for_flight(read).unwrap();
    assert_eq!(
        arrow::compute::concat_batches(&b.schema(), &pieces).unwrap(),
        b
    );
    let sent: usize = futures::executor::block_on(
        flight_encoder(b.schema(), ObjectCompression::None)
            .unwrap()
            .build(futures::stream::iter(pieces.into_iter().map(Ok)))
            .map_ok(|d| d.data_body.len())
            .try_collect::<Vec<_>>(),
    )
    .unwrap()
    .into_iter()
    .sum();
    assert!(
        (sent as u64) < size * 3 / 2,
        "{sent} bytes sent for a batch of {size}"
    );
}

/// A shared-folder file mapped into memory gives the batches it holds (a dictionary
/// column too), all or one through the index, still whole after the file is
/// removed; a file that is not Arrow IPC, or a batch it lacks, is an error.
#[test]
fn mapped_object_files_give_their_batches_without_reading_them() {
    use arrow::array::{ArrayRef, DictionaryArray, StringArray};
    use arrow::datatypes::Int32Type;
    let dir = tempfile::tempdir().unwrap();
    let batches: Vec<RecordBatch> = (0..3)
        .map(|p| {
            let keys: DictionaryArray<Int32Type> =
                (0..1000 + p).map(|i| ["a", "b", "c"][i % 3]).collect();
            RecordBatch::try_from_iter([
                (
                    "k",
                    Arc::new(Int64Array::from_iter_values(0..1000 + p as i64)) as ArrayRef,
                ),
                (
                    "s",
                    Arc::new(StringArray::from_iter_values(
                        (0..1000 + p).map(|i| format!("row {i}")),
                    )),
                ),
                ("d", Arc::new(keys)),
            ])
            .unwrap()
        })
        .collect();
    let path = dir.path().join("object.arrow");
    write_file(&path, &batches, ObjectCompression::None).unwrap();
    assert_eq!(map_shared_file(&path, None).unwrap(), batches);
    let second = map_shared_file(&path, Some(1)).unwrap();
    // Counted as its own block's bytes, not the file's.
    let file_len = std::fs::metadata(&path).unwrap().len() as usize;
    let counted = volley_common::batch_memory(&second[0]) as usize;
    assert!(counted < file_len / 2, "{counted} of {file_len}");
    std::fs::remove_file(&path).unwrap();
    assert_eq!(second, vec![batches[1].clone()]);
    write_file(&path, &batches, ObjectCompression::None).unwrap();
    let err = map_shared_file(&path, Some(3)).unwrap_err().to_string();
    assert!(err.contains("3 batches; batch 3"), "{err}");
    let empty = dir.path().join("empty.arrow");
    write_file(&empty, &[], ObjectCompression::None).unwrap();
    assert!(map_shared_file(&empty, Some(0)).unwrap().is_empty());
    let junk = dir.path().join("junk.arrow");
    std::fs::write(&junk, b"not arrow").unwrap();
    let err = map_shared_file(&junk, None).unwrap_err().to_string();
    assert!(err.contains("junk.arrow"), "{err}");
}

/// Each compression writes files and Flight messages that read back as the same
/// batches, one by one through the file's index too; LZ4 and ZSTD take fewer bytes
/// than none for columnar data; an unknown name is refused with the choices.
#[test]
fn compressed_objects_read_back_the_same_and_take_fewer_bytes() {
    use arrow::array::{ArrayRef, StringArray};
    let dir = tempfile::tempdir().unwrap();
    let batches: Vec<RecordBatch> = (0..3)
        .map(|p| {
            RecordBatch::try_from_iter([
                (
                    "k",
                    Arc::new(Int64Array::from_iter_values(
                        (0..50_000).map(|i| i % 97 + p),
                    )) as ArrayRef,
                ),
                (
                    "s",
                    Arc::new(StringArray::from_iter_values(
                        (0..50_000).map(|i| format!("flag-{}", i % 3)),
                    )),
                ),
            ])
            .unwrap()
        })
        .collect();
    let mut sizes = HashMap::new();
    for c in [
        ObjectCompression::None,
        ObjectCompression::Lz4,
        ObjectCompression::Zstd,
    ] {
        let path = dir.path().join(format!("{c}.arrow"));
        write_file(&path, &batches, c).unwrap();
        assert_eq!(read_file(&path).unwrap(), batches, "{c}");
        assert_eq!(
            read_file_batch(&path, 2).unwrap(),
            vec![batches[2].clone()],
            "{c}"
        );
        sizes.insert(c, std::fs::metadata(&path).unwrap().len());
        let data: Vec<FlightData> = futures::executor::block_on(
            flight_encoder(batches[0].schema(), c)
                .unwrap()
                .build(futures::stream::iter(batches.clone().into_iter().map(Ok)))
                .try_collect(),
        )
        .unwrap();
        let back: Vec<RecordBatch> = futures::executor::block_on(
            FlightRecordBatchStream::new_from_flight_data(futures::stream::iter(
                data.into_iter().map(Ok),
            ))
            .try_collect(),
        )
        .unwrap();
        assert_eq!(back, batches, "{c} over Flight");
    }
    let none = sizes[&ObjectCompression::None];
    for c in [ObjectCompression::Lz4, ObjectCompression::Zstd] {
        assert!(
            sizes[&c] * 2 < none,
            "{c}: {} bytes vs {none} uncompressed",
            sizes[&c]
        );
    }
    assert_eq!(
        "LZ4".parse::<ObjectCompression>().unwrap(),
        ObjectCompression::Lz4
    );
    let e = "snappy"
        .parse::<ObjectCompression>()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("snappy") && e.contains("auto, none, lz4 or zstd"),
        "{e}"
    );
    // The default compresses what goes to another host only.
    let auto = ObjectCompression::default();
    assert_eq!(auto, ObjectCompression::Auto);
    assert_eq!(auto.for_peer(true), ObjectCompression::Lz4);
    assert_eq!(auto.for_peer(false), ObjectCompression::None);
    assert_eq!(
        ObjectCompression::Zstd.for_peer(false),
        ObjectCompression::Zstd
    );
}

/// A batch of a file goes over Flight as the file's own message where the file's
/// compression is the peer's, and reads back the same; an empty batch sends none;
/// another compression, a dictionary column or a batch the file lacks leave it to
/// the encoder.
#[test]
fn a_file_batch_goes_over_flight_as_the_file_holds_it() {
    use arrow::array::{ArrayRef, DictionaryArray, StringViewArray};
    use arrow::datatypes::Int32Type;
    let dir = tempfile::tempdir().unwrap();
    let part = |from: i64, n: i64| {
        RecordBatch::try_from_iter([
            (
                "k",
                Arc::new(Int64Array::from_iter_values(from..from + n)) as ArrayRef,
            ),
            (
                "s",
                Arc::new(StringViewArray::from_iter_values(
                    (from..from + n).map(|i| format!("a string longer than twelve {i}")),
                )),
            ),
        ])
        .unwrap()
    };
    let batches = vec![part(0, 30_000), part(0, 0), part(7, 5)];
    let read = |messages: Vec<FlightData>| -> Vec<RecordBatch> {
        futures::executor::block_on(
            FlightRecordBatchStream::new_from_flight_data(futures::stream::iter(
                messages.into_iter().map(Ok),
            ))
            .try_collect(),
        )
        .unwrap()
    };
    for c in [
        ObjectCompression::None,
        ObjectCompression::Lz4,
        ObjectCompression::Zstd,
    ] {
        let path = dir.path().join(format!("{c}.arrow"));
        write_file(&path, &batches, c).unwrap();
        for (i, b) in batches.iter().enumerate() {
            let messages = file_batch_messages(&path, i as u32, c)
                .unwrap()
                .expect("sent as the file holds it");
            let want: Vec<RecordBatch> =
                (b.num_rows() > 0).then(|| b.clone()).into_iter().collect();
            assert_eq!(read(messages), want, "{c}, batch {i}");
        }
        let other = match c {
            ObjectCompression::None => ObjectCompression::Lz4,
            _ => ObjectCompression::None,
        };
        assert!(
            file_batch_messages(&path, 0, other).unwrap().is_none(),
            "{c}"
        );
        assert!(file_batch_messages(&path, 3, c).unwrap().is_none(), "{c}");
    }
    // `Auto` writes files as `None` does, and sends them so to this host.
    let path = dir.path().join("none.arrow");
    assert!(file_batch_messages(&path, 0, ObjectCompression::Auto)
        .unwrap()
        .is_some());
    let keys = arrow::array::Int32Array::from(vec![0, 1, 0]);
    let values = Arc::new(arrow::array::StringArray::from(vec!["a", "b"]));
    let dict = RecordBatch::try_from_iter([(
        "d",
        Arc::new(DictionaryArray::<Int32Type>::try_new(keys, values).unwrap()) as ArrayRef,
    )])
    .unwrap();
    let path = dir.path().join("dict.arrow");
    write_file(&path, &[dict], ObjectCompression::None).unwrap();
    assert!(file_batch_messages(&path, 0, ObjectCompression::None)
        .unwrap()
        .is_none());
    assert!(file_batch_messages(&dir.path().join("absent"), 0, ObjectCompression::None).is_err());
}

#[test]
fn small_objects_travel_inline_and_big_ones_do_not() {
    let small = vec![batch(10), batch(5)];
    let bytes = encode_inline(&small).expect("small enough");
    let back = decode_inline("o", &bytes).unwrap();
    assert_eq!(back, small);
    assert_eq!(
        decode_inline("o", &encode_inline(&[]).unwrap()).unwrap(),
        vec![]
    );
    assert!(encode_inline(&[batch(100_000)]).is_none());
    let err = decode_inline("job:t-1", b"not arrow")
        .unwrap_err()
        .to_string();
    assert!(err.contains("job:t-1"), "{err}");
}

#[test]
fn spills_oldest_beyond_the_limit_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let one = batches_size(&[batch(10_000)]);
    let store = ObjectStore::new(one * 2, dir.path().to_path_buf());
    for i in 0..5 {
        store.put(&format!("o{i}"), vec![batch(10_000)]).unwrap();
    }
    let (mem, spilled) = store.usage();
    assert!(mem <= one * 2, "{mem} in memory");
    assert_eq!(spilled, one * 3);
    assert_eq!(store.spilled_total(), one * 3);
    let back = store.get("o0").unwrap().unwrap();
    assert_eq!(back[0].num_rows(), 10_000);
    store.free(&["o0".to_string()]);
    assert!(store.get("o0").unwrap().is_none());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

/// A spill that fails (its folder cannot be made) keeps its object in memory: the put
/// that needed room still stores its own object and succeeds.
#[test]
fn a_failed_spill_keeps_its_object_and_the_put_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_folder = dir.path().join("file");
    std::fs::write(&not_a_folder, b"x").unwrap();
    let one = batches_size(&[batch(10_000)]);
    let store = ObjectStore::new(one, not_a_folder.join("spill"));
    for i in 0..3 {
        store.put(&format!("o{i}"), vec![batch(10_000)]).unwrap();
    }
    let (mem, spilled) = store.usage();
    assert_eq!((mem, spilled), (one * 3, 0));
    for i in 0..3 {
        assert_eq!(
            store.get(&format!("o{i}")).unwrap().unwrap()[0].num_rows(),
            10_000
        );
    }
}

#[test]
fn a_ticket_names_a_slice_and_the_node_cuts_only_those_rows() {
    for selection in [
        Selection::All,
        Selection::Rows {
            offset: 7,
            rows: 30,
        },
        Selection::Batch(3),
    ] {
        assert_eq!(
            parse_ticket(&ticket("j:t-1", selection)).unwrap(),
            ("j:t-1".into(), selection)
        );
    }
    let err = parse_ticket(b"j:t-1\x00x\x003").unwrap_err().to_string();
    assert!(err.contains("j:t-1") && err.contains("`x`"), "{err}");

    let batches = vec![batch(10), batch(5), batch(20)];
    let cut = slice_rows(&batches, 8, 10).unwrap();
    let rows: Vec<usize> = cut.iter().map(RecordBatch::num_rows).collect();
    assert_eq!(rows, vec![2, 5, 3]);
    let first = cut[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(first.values(), &[8, 9]);
    assert!(slice_rows(&batches, 0, 35).is_ok());
    let err = slice_rows(&batches, 30, 10).unwrap_err().to_string();
    assert!(err.contains("30..40") && err.contains("35 rows"), "{err}");
}

/// Batches of different types are refused, not written under the first one's schema
/// (which every batch is decoded with).
#[test]
fn an_object_of_batches_of_two_schemas_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.arrow");
    let wide = RecordBatch::try_from_iter([(
        "x",
        Arc::new(arrow::array::Int32Array::from(vec![1, 2])) as arrow::array::ArrayRef,
    )])
    .unwrap();
    let e = write_file(&path, &[batch(3), wide], ObjectCompression::None).unwrap_err();
    assert!(e.to_string().contains("share one schema"), "{e}");
    write_file(&path, &[batch(3), batch(2)], ObjectCompression::None).unwrap();
    assert_eq!(read_file(&path).unwrap().len(), 2);
}

/// What a dead worker wrote and did not hand over is removed; what it handed over, and
/// other workers' files, stay.
#[test]
fn a_dead_workers_files_not_handed_over_are_removed() {
    let spill = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let one = vec![batch(10)];
    for name in [
        "w41--a-1.arrow",
        "w41--b-2.arrow",
        "w4--c-3.arrow",
        "w141--d-4.arrow",
    ] {
        write_ipc(&shared.path().join(name), &one);
    }
    let store = ObjectStore::new(1 << 30, spill.path().to_path_buf())
        .with_shared_dir(shared.path().to_path_buf());
    store.adopt("b", "w41--b-2.arrow").unwrap();
    store.drop_unadopted("w41");
    let mut left: Vec<String> = std::fs::read_dir(shared.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["w141--d-4.arrow", "w4--c-3.arrow", "w41--b-2.arrow"]);
    assert_eq!(*store.get("b").unwrap().unwrap(), one);
}

/// Batches cut into pieces to travel over Flight are put back as they were: an
/// object's batches are read by index (a map task's batch `p` is partition `p`).
#[test]
fn batches_cut_to_travel_are_stored_as_they_were() {
    let batches = vec![
        batch(1_000_000),
        batch(0),
        batch(3),
        batch(600_000),
        batch(0),
    ];
    let schema = batches[0].schema();
    let rows = batch_rows(&batches);
    let pieces = for_flight(batches.clone()).unwrap();
    assert!(pieces.len() > batches.len());
    let back = regroup(&schema, pieces.clone(), &rows).unwrap();
    assert_eq!(back, batches);
    // Pieces missing or left over are an error, not another object.
    let e = regroup(&schema, pieces[1..].to_vec(), &rows).unwrap_err();
    assert!(e.to_string().contains("cut short"), "{e}");
    let e = regroup(&schema, pieces, "1000000,0,3").unwrap_err();
    assert!(e.to_string().contains("more rows"), "{e}");
}
