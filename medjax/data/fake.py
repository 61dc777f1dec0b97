"""Synthetic datasets in the exact public layouts, with a learnable signal, for tests and the demo.

Every image is a smooth random background plus noise, with the label drawn into it: for a class k of K, a bright
disc at angle 2*pi*k/K around the centre (RGB sets also tint it); for a multi-label finding j, a bright square in
cell j of a 4x4 grid; for a mammogram, a bright blob (malignant / cancer: large and irregular; benign: small).
Labels, patients and splits are drawn from `seed`, so the same call writes the same files.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import uuid

import h5py
import nibabel
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medjax.data import aptos2019, cbis_ddsm, chexpert, ham10000, isic2018, isic2019
from medjax.data import nih_chestxray14 as nih
from medjax.data.records import DataError

log = logging.getLogger(__name__)
MARKER = ".medjax_fake.json"  # in a folder written by write_once: what was asked for

# ------------------------------------------------------------------------------------------------------ pixels


def _background(rng, h, w, channels):
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 70 + 40 * np.sin(2 * np.pi * (rng.random() + yy * rng.uniform(0.5, 1.5))) * np.cos(xx * rng.uniform(1, 3))
    img = base[..., None] + rng.normal(0, 6, (h, w, channels))
    if channels == 3:
        img = img * np.array([1.2, 0.8, 0.5])  # a warm, skin- or fundus-like tint
    return img


def _disc(img, cy, cx, r, value, irregular=0.0, rng=None):
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + irregular * np.sin(5 * angle + (rng.random() * 6 if rng is not None else 0)))
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    img[inside] += value
    return img


def class_image(rng, h, w, channels, k, num_classes):
    """Class k of K: a disc at angle 2*pi*k/K around the centre (tinted per class in RGB)."""
    img = _background(rng, h, w, channels)
    a = 2 * np.pi * k / num_classes
    m = min(h, w)
    value = 90 if channels == 1 else np.roll(np.array([100.0, 40.0, 40.0]), k % 3) + 20 * (k // 3)
    return _disc(img, h / 2 + 0.28 * m * np.sin(a), w / 2 + 0.28 * m * np.cos(a), 0.13 * m, value)


def multilabel_image(rng, h, w, hot):
    """Finding j present: a bright square in cell j of a 4x4 grid."""
    img = _background(rng, h, w, 1)
    for j, v in enumerate(hot):
        if v:
            r, c = divmod(j, 4)
            y0, x0 = int((r + 0.2) * h / 4), int((c + 0.2) * w / 4)
            img[y0:y0 + int(0.6 * h / 4), x0:x0 + int(0.6 * w / 4)] += 80
    return img


def mammogram(rng, h, w, grade):
    """0 normal, 1 benign (small smooth blob), 2 malignant (large irregular blob)."""
    img = _background(rng, h, w, 1)
    if grade:
        m = min(h, w)
        _disc(img, rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w, (0.08 if grade == 1 else 0.16) * m,
              70 if grade == 1 else 110, irregular=0.0 if grade == 1 else 0.35, rng=rng)
    return img


def _u8(img):
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img[..., 0] if img.shape[-1] == 1 else img


def _save(img8: np.ndarray, path: str, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img8).save(path, **kw)


def _save_png16(img: np.ndarray, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.clip(np.rint(img[..., 0] * 257), 0, 65535).astype(np.uint16)
    Image.fromarray(arr).save(path)  # mode I;16


def save_dicom(img: np.ndarray, path: str, patient_id: str = "P_00000"):
    """A 16-bit MONOCHROME2 uncompressed DICOM, as the CBIS-DDSM full mammograms are."""
    arr = np.clip(np.rint(img[..., 0] * 257), 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture, as CBIS-DDSM's files
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.BodyPartExamined = patient_id, "MG", "BREAST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_csv(path: str, header: list[str], rows: list[list]):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _labels(rng, num, k):
    """Every class at least once (when num >= k), the rest uniform."""
    labels = list(range(min(num, k))) + list(rng.integers(0, k, max(0, num - k)))
    return [int(v) for v in rng.permutation(labels)]


# ------------------------------------------------------------------------------------------------------ writers

def write_chexpert(root, num, rng, size):
    """root = CheXpert-v1.0-small: train.csv (num rows) and valid.csv (max(2, num // 8) rows), grayscale JPEGs at
    train/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg; cells 1.0, 0.0, -1.0 or empty."""
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.CLASS_NAMES]
    h, w = size, int(size * 0.82)

    def rows_for(split, count, first_patient):
        rows, patient = [], first_patient
        while len(rows) < count:
            sex, age = rng.choice(["Male", "Female"]), int(rng.integers(20, 90))
            for study in range(1, rng.integers(1, 3) + 1):
                for view, kind in ((1, "frontal"), (2, "lateral"))[:rng.integers(1, 3)]:
                    if len(rows) == count:
                        break
                    cells = list(rng.choice(["1.0", "-1.0", "0.0", ""], size=13, p=[0.15, 0.08, 0.12, 0.65]))
                    no_finding = "" if "1.0" in cells else "1.0"
                    rel = f"{split}/patient{patient:05d}/study{study}/view{view}_{kind}.jpg"
                    hot = [int(c == "1.0") for c in [no_finding] + cells]
                    _save(_u8(multilabel_image(rng, h, w, hot)), os.path.join(root, rel), quality=92)
                    rows.append([f"CheXpert-v1.0-small/{rel}", sex, age, kind.capitalize(),
                                 rng.choice(["AP", "PA"]) if kind == "frontal" else "", no_finding, *cells])
            patient += 1
        return rows

    _write_csv(os.path.join(root, "train.csv"), header, rows_for("train", num, 1))
    _write_csv(os.path.join(root, "valid.csv"), header, rows_for("valid", max(2, num // 8), 64541))
    return num + max(2, num // 8)


def write_ddsm(root, num, rng, size):
    """ddsm_raw_image_lists/{train,val,test}.txt (cases ~70/15/15) and 16-bit PNGs ddsm_raw/<prefix>_<case>_<n>.
    <SIDE>_<VIEW>.png; the prefix (normal, benign, cancer) is the label, the case (A_0001) the patient."""
    lists, case = {"train": [], "val": [], "test": []}, 0
    h, w = size, int(size * 0.6)
    while sum(map(len, lists.values())) < num:
        case += 1
        grade = int(rng.integers(0, 3))
        prefix = ("normal", "benign", "cancer")[grade]
        volume = "ABCD"[grade if grade < 2 else 2 + int(rng.integers(0, 2))]
        split = rng.choice(["train", "val", "test"], p=[0.7, 0.15, 0.15])
        for view in ("LEFT_CC", "LEFT_MLO", "RIGHT_CC", "RIGHT_MLO")[:int(rng.integers(1, 5))]:
            if sum(map(len, lists.values())) == num:
                break
            name = f"{prefix}_{volume}_{case:04d}_1.{view}.png"
            _save_png16(mammogram(rng, h, w, grade), os.path.join(root, "ddsm_raw", name))
            lists[split].append(name)
    for split, names in lists.items():
        os.makedirs(os.path.join(root, "ddsm_raw_image_lists"), exist_ok=True)
        with open(os.path.join(root, "ddsm_raw_image_lists", f"{split}.txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))
    return num


def _uid(rng):
    return "1.3.6.1.4.1.9590.100.1.2." + "".join(str(d) for d in rng.integers(0, 10, 38))


def write_cbis_ddsm(root, num, rng, size):
    """The TCIA layout: four case description CSVs in root and the NBIA tree root/CBIS-DDSM/<Type>-<Split>_<patient>
    _<SIDE>_<VIEW>/<date>-DDSM-NNNNN/1.000000-full mammogram images-NNNNN/1-1.dcm (16-bit DICOM), plus ROI folders
    <...>_<abnormality id>/ with small mask/crop DICOMs. The CSV image paths use UIDs, as the real ones do. num full
    mammograms; patients ~80/20 train/test; with num >= 12 one patient is in both sets, as happens in the real data."""
    h, w = size, int(size * 0.6)
    mass_cols = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                 "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                 "image file path", "cropped image file path", "ROI mask file path"]
    calc_cols = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                 "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                 "image file path", "cropped image file path", "ROI mask file path"]
    rows = {key: [] for key in cbis_ddsm.CSV_FILES}

    def image(pid, split, kind, side, view):
        pathologies = list(rng.choice(["MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"], int(rng.integers(1, 3)),
                                      p=[0.4, 0.4, 0.2]))
        grade = 2 if "MALIGNANT" in pathologies else 1
        series = f"{kind.capitalize()}-{'Training' if split == 'train' else 'Test'}_{pid}_{side}_{view}"
        number = int(rng.integers(10000, 99999))
        dcm = os.path.join(root, "CBIS-DDSM", series, f"07-20-2016-DDSM-{number}",
                           f"1.000000-full mammogram images-{number % 97 + 10000}", "1-1.dcm")
        save_dicom(mammogram(rng, h, w, grade), dcm, pid)
        for ab_id, pathology in enumerate(pathologies, 1):
            roi_dir = os.path.join(root, "CBIS-DDSM", f"{series}_{ab_id}", f"07-21-2016-DDSM-{number}",
                                   f"1.000000-ROI mask images-{number % 89 + 20000}")
            save_dicom(np.zeros((8, 8, 1)), os.path.join(roi_dir, "1-1.dcm"), pid)
            save_dicom(np.full((8, 8, 1), 200.0), os.path.join(roi_dir, "1-2.dcm"), pid)
            image_path = f"{series}/{_uid(rng)}/{_uid(rng)}/000000.dcm"
            crop_path = f"{series}_{ab_id}/{_uid(rng)}/{_uid(rng)}/000000.dcm\n"  # the real cells end in \n
            roi_path = f"{series}_{ab_id}/{_uid(rng)}/{_uid(rng)}/000001.dcm\n"
            shape = ["IRREGULAR", "SPICULATED"] if kind == "mass" else ["PLEOMORPHIC", "CLUSTERED"]
            rows[kind, split].append([pid, int(rng.integers(1, 5)), side, view, ab_id, kind, *shape,
                                      int(rng.integers(2, 6)), pathology, int(rng.integers(1, 6)),
                                      image_path, crop_path, roi_path])

    overlap = num >= 12
    written, patient, first = 0, 0, None
    views = [(s, v) for s in ("LEFT", "RIGHT") for v in ("CC", "MLO")]
    while written < num - overlap:
        patient += 1
        pid = f"P_{patient:05d}"
        split = "test" if rng.random() < 0.2 else "train"
        kind = "mass" if rng.random() < 0.5 else "calc"
        first = first or (pid, split, kind)
        for side, view in views[:int(rng.integers(1, 3))]:
            if written < num - overlap:
                image(pid, split, kind, side, view)
                written += 1
    if overlap:  # the first patient again, in the other set, with the other abnormality type and a view not used
        pid, split, kind = first
        image(pid, "test" if split == "train" else "train", "calc" if kind == "mass" else "mass", "RIGHT", "MLO")
    for (kind, split), name in cbis_ddsm.CSV_FILES.items():
        _write_csv(os.path.join(root, name), mass_cols if kind == "mass" else calc_cols, rows[kind, split])
    return num


def write_isic2019(root, num, rng, size):
    """ISIC_2019_Training_GroundTruth.csv (one-hot 1.0/0.0 over the 8 classes + UNK), the metadata CSV (some images
    share a lesion_id) and RGB JPEGs in ISIC_2019_Training_Input/ISIC_2019_Training_Input/."""
    h, w = int(size * 0.75), size
    gt, meta, lesion = [], [], 0
    for i, k in enumerate(_labels(rng, num, len(isic2019.CLASS_NAMES))):
        name = f"ISIC_{i:07d}"
        _save(_u8(class_image(rng, h, w, 3, k, len(isic2019.CLASS_NAMES))),
              os.path.join(root, isic2019.IMAGES, isic2019.IMAGES, name + ".jpg"), quality=92)
        gt.append([name] + ["1.0" if j == k else "0.0" for j in range(len(isic2019.CLASS_NAMES))] + ["0.0"])
        if rng.random() < 0.3:
            lesion_id = ""  # older ISIC images have no lesion id
        else:
            lesion += int(rng.random() < 0.6)  # otherwise the lesion of the previous image is photographed again
            lesion_id = f"HAM_{max(lesion, 1):07d}"
        meta.append([name, int(rng.integers(2, 18)) * 5, rng.choice(["anterior torso", "head/neck", "lower extremity"]),
                     lesion_id, rng.choice(["male", "female"])])
    _write_csv(os.path.join(root, isic2019.GROUND_TRUTH), ["image", *isic2019.CLASS_NAMES, "UNK"], gt)
    _write_csv(os.path.join(root, isic2019.METADATA),
               ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], meta)
    return num


def write_aptos2019(root, num, rng, size):
    """train_1.csv (id_code, diagnosis 0-4) and RGB PNGs train_images/train_images/<id_code>.png."""
    rows = []
    for k in _labels(rng, num, len(aptos2019.CLASS_NAMES)):
        code = "".join(rng.choice(list("0123456789abcdef"), 12))
        _save(_u8(class_image(rng, size, size, 3, k, len(aptos2019.CLASS_NAMES))),
              os.path.join(root, "train_images", "train_images", code + ".png"))
        rows.append([code, k])
    _write_csv(os.path.join(root, "train_1.csv"), ["id_code", "diagnosis"], rows)
    return num


def write_nih_chestxray14(root, num, rng, size):
    """Data_Entry_2017.csv with NIH's exact header (including the split `OriginalImage[Width,Height]` columns and the
    trailing comma), train_val_list.txt / test_list.txt (about 20% of the patients in test) and grayscale PNGs
    NNNNNNNN_NNN.png spread over images_001/images/, images_002/images/ (the Kaggle layout)."""
    rows, lists, patient = [], {"train_val": [], "test": []}, 0
    while len(rows) < num:
        patient += 1
        split = "test" if rng.random() < 0.2 else "train_val"
        for k in range(min(int(rng.integers(1, 4)), num - len(rows))):
            hot = [int(v) for v in rng.random(len(nih.FINDINGS)) < 0.12]
            labels = "|".join(f for f, v in zip(nih.FINDINGS, hot) if v) or nih.NO_FINDING
            name = f"{patient:08d}_{k:03d}.png"
            folder = f"images_{1 + len(rows) * 2 // max(num, 1):03d}"
            _save(_u8(multilabel_image(rng, size, size, hot)), os.path.join(root, folder, "images", name))
            rows.append(f"{name},{labels},{k},{patient},{int(rng.integers(20, 80))},{rng.choice(['M', 'F'])},"
                        f"{rng.choice(['PA', 'AP'])},2500,2048,0.143,0.143,")
            lists[split].append(name)
    with open(os.path.join(root, "Data_Entry_2017.csv"), "w") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n" + "\n".join(rows) + "\n")
    for split, names in lists.items():
        with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
            f.write("".join(n + "\n" for n in sorted(names)))
    return num


def write_chest_xray_pneumonia(root, num, rng, size):
    """chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/ grayscale JPEGs named as in the real set: IM-NNNN-NNNN.jpeg,
    NORMAL2-IM-NNNN-NNNN.jpeg, personN_bacteria_M.jpeg, personN_virus_M.jpeg; patients ~ 70/10/20 train/val/test."""
    written, patient, image = 0, 0, 0
    while written < num:
        patient += 1
        split = rng.choice(["train", "val", "test"], p=[0.7, 0.1, 0.2])
        kind = int(rng.integers(0, 3))  # 0 normal, 1 bacteria, 2 virus
        for k in range(min(int(rng.integers(1, 4)), num - written)):
            image += 1
            if kind == 0:
                prefix = "NORMAL2-" if patient % 2 else ""
                name, folder = f"{prefix}IM-{patient:04d}-{k + 1:04d}.jpeg", "NORMAL"
            else:
                name, folder = f"person{patient}_{'bacteria' if kind == 1 else 'virus'}_{image}.jpeg", "PNEUMONIA"
            _save(_u8(class_image(rng, size, int(size * 1.2), 1, kind, 3)),
                  os.path.join(root, "chest_xray", split, folder, name), quality=90)
            written += 1
    return num


def write_ham10000(root, num, rng, size):
    """HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization; lesions of 1-3 images) and
    RGB JPEGs ISIC_NNNNNNN.jpg split over HAM10000_images_part_1/ and HAM10000_images_part_2/."""
    rows, lesion, image = [], 0, 24306
    while len(rows) < num:
        lesion += 1
        k = int(rng.integers(0, len(ham10000.CLASS_NAMES)))
        for _ in range(min(int(rng.integers(1, 4)), num - len(rows))):
            name = f"ISIC_{image:07d}"
            part = 1 if len(rows) < num / 2 else 2
            _save(_u8(class_image(rng, int(size * 0.75), size, 3, k, len(ham10000.CLASS_NAMES))),
                  os.path.join(root, f"HAM10000_images_part_{part}", name + ".jpg"), quality=92)
            rows.append([f"HAM_{lesion:07d}", name, ham10000.CLASS_NAMES[k], rng.choice(["histo", "follow_up"]),
                         int(rng.integers(2, 18)) * 5, rng.choice(["male", "female"]), "back"])
            image += 1
    _write_csv(os.path.join(root, ham10000.METADATA),
               ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows)
    return num


def write_isic2018(root, num, rng, size):
    """ISIC2018_Task3_{Training,Validation,Test}_GroundTruth/<same>.csv (image + one-hot 1.0/0.0 over MEL, NV, BCC,
    AKIEC, BKL, DF, VASC) with ISIC2018_Task3_*_Input/ISIC_NNNNNNN.jpg (plus the archives' LICENSE.txt), about
    80/10/10, and ISIC2018_Task3_Training_LesionGroupings.csv."""
    sets = {"Training": [], "Validation": [], "Test": []}
    groupings, lesion = [], 0
    for i, k in enumerate(_labels(rng, num, len(isic2018.CLASS_NAMES))):
        which = "Training" if i < max(1, int(num * 0.8)) else "Validation" if i < int(num * 0.9) else "Test"
        name = f"ISIC_{24306 + i:07d}"
        folder = os.path.join(root, f"{isic2018.PREFIX}{which}_Input")
        _save(_u8(class_image(rng, int(size * 0.75), size, 3, k, len(isic2018.CLASS_NAMES))),
              os.path.join(folder, name + ".jpg"), quality=92)
        sets[which].append([name] + ["1.0" if j == k else "0.0" for j in range(len(isic2018.CLASS_NAMES))])
        if which == "Training":
            lesion += int(rng.random() < 0.6) or lesion == 0
            groupings.append([name, f"HAM_{lesion:07d}", "histopathology"])
    for which, rows in sets.items():
        name = f"{isic2018.PREFIX}{which}_GroundTruth"
        if rows:
            _write_csv(os.path.join(root, name, name + ".csv"), ["image", *isic2018.CLASS_NAMES], rows)
            with open(os.path.join(root, f"{isic2018.PREFIX}{which}_Input", "LICENSE.txt"), "w") as f:
                f.write("CC-BY-NC\n")
    _write_csv(os.path.join(root, isic2018.GROUPINGS), ["image", "lesion_id", "diagnosis_confirm_type"], groupings)
    return num


def write_ichallenge_amd(root, num, rng, size):
    """Training400/AMD/ANNNN.jpg and Training400/Non-AMD/NNNNN.jpg (RGB fundus-like JPEGs, about 1/4 AMD)."""
    counts = [0, 0]
    for k in [int(v) for v in rng.permutation([1] * max(1, num // 4) + [0] * (num - max(1, num // 4)))]:
        counts[k] += 1
        name = f"{'A' if k else 'N'}{counts[k]:04d}.jpg"
        _save(_u8(class_image(rng, size, size, 3, k, 2)),
              os.path.join(root, "Training400", "AMD" if k else "Non-AMD", name), quality=92)
    return num


def write_brain_tumor_figshare(root, num, rng, size):
    """<N>.mat MATLAB v7.3 files (HDF5 with MATLAB's 512-byte header) spread over brainTumorDataPublic_1-K folders:
    struct cjdata with image (int16, stored transposed as MATLAB does), label (1-3), PID (uint16 character codes),
    tumorBorder and tumorMask; patients of 1-4 slices; cvind.mat with a fold 1-5 per slice (by patient)."""
    per_folder = max(1, -(-num // 4))
    folds, n, patient = [], 0, 0
    while n < num:
        patient += 1
        label, pid, fold = int(rng.integers(1, 4)), str(int(rng.integers(100000, 999999))), patient % 5 + 1
        for _ in range(min(int(rng.integers(1, 5)), num - n)):
            n += 1
            first = (n - 1) // per_folder * per_folder + 1
            folder = os.path.join(root, f"brainTumorDataPublic_{first}-{min(first + per_folder - 1, num)}")
            image = np.rint(class_image(rng, size, size, 1, label - 1, 3)[..., 0] * 4).astype(np.int16)
            mask = (image > np.percentile(image, 95)).astype(np.uint8)
            os.makedirs(folder, exist_ok=True)
            _write_mat(os.path.join(folder, f"{n}.mat"), h5py, {
                "image": image.T, "label": np.array([[float(label)]]),
                "PID": np.array([[ord(c)] for c in pid], np.uint16).T, "tumorBorder": np.zeros((1, 8)),
                "tumorMask": mask.T})
            folds.append(fold)
    with h5py.File(os.path.join(root, "cvind.mat"), "w", userblock_size=512) as f:
        f.create_dataset("cvind", data=np.array(folds, np.float64)[None, :])
    _mat_header(os.path.join(root, "cvind.mat"))
    return num


def _mat_header(path):
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")


def _write_mat(path, h5py, fields):
    with h5py.File(path, "w", userblock_size=512) as f:
        group = f.create_group("cjdata")
        for key, value in fields.items():
            group.create_dataset(key, data=value)
    _mat_header(path)


GENERIC_CLASSES = ["class_a", "class_b", "class_c"]


def write_csv_dataset(root, num, rng, size):
    """labels.csv (image, label with class names class_a/b/c) and RGB PNGs in images/."""
    rows = []
    for i, k in enumerate(_labels(rng, num, len(GENERIC_CLASSES))):
        rel = f"images/img_{i:05d}.png"
        _save(_u8(class_image(rng, size, size, 3, k, len(GENERIC_CLASSES))), os.path.join(root, rel))
        rows.append([rel, GENERIC_CLASSES[k]])
    _write_csv(os.path.join(root, "labels.csv"), ["image", "label"], rows)
    return num


def write_folder(root, num, rng, size):
    """root/<class>/img_NNNNN.png for classes class_a/b/c."""
    for i, k in enumerate(_labels(rng, num, len(GENERIC_CLASSES))):
        _save(_u8(class_image(rng, size, size, 3, k, len(GENERIC_CLASSES))),
              os.path.join(root, GENERIC_CLASSES[k], f"img_{i:05d}.png"))
    return num


def write_volumes(root, num, rng, size):
    """volumes.csv (volume, label, patient) over `num` 3-D studies of 6-10 slices, binary ('normal' / 'lesion': a
    bright ball in the middle slices), in the three forms the reader takes, in turn: a folder of PNG slices named
    slice1..slice10 (natural order), a folder of CT DICOM slices in Hounsfield units whose file names are shuffled
    (the order comes from ImagePositionPatient), and a NIfTI file."""
    labels = _labels(rng, num, 2)
    rows = []
    for i in range(num):
        depth = int(rng.integers(6, 11))
        vol = np.stack([_background(rng, size, size, 1)[..., 0] for _ in range(depth)])  # grey levels ~30..110
        if labels[i]:
            zc, yc, xc = depth / 2, rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size
            z, y, x = np.mgrid[:depth, :size, :size]
            r = size * 0.15
            vol = np.where((((z - zc) * size / depth / 2) ** 2 + (y - yc) ** 2 + (x - xc) ** 2) < r * r, 230.0, vol)
        patient = f"V{i // 2:04d}"  # two studies per patient
        kind = i % 3
        if kind == 0:
            name = f"png/study{i:04d}"
            for k in range(depth):
                _save(_u8(vol[k][..., None]), os.path.join(root, name, f"slice{k + 1}.png"))
        elif kind == 1:
            name = f"dicom/study{i:04d}"
            order = rng.permutation(depth)
            for k in range(depth):  # grey 0..255 -> -1000..+1000 HU
                _save_ct_slice(vol[k] / 255 * 2000 - 1000, os.path.join(root, name, f"IM{order[k]:04d}.dcm"), patient,
                               k)
        else:
            name = f"nifti/study{i:04d}.nii.gz"
            os.makedirs(os.path.join(root, "nifti"), exist_ok=True)
            data = np.transpose(vol, (2, 1, 0)).astype(np.float32)  # (x, y, z): slice k is data[:, :, k].T
            nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), os.path.join(root, name))
        rows.append([name, ("normal", "lesion")[labels[i]], patient])
    _write_csv(os.path.join(root, "volumes.csv"), ["volume", "label", "patient"], rows)
    return num


def _save_ct_slice(hu: np.ndarray, path: str, patient_id: str, position: int):
    """One CT slice: 16-bit stored values with RescaleSlope 1 / RescaleIntercept -1024, positioned along z."""
    arr = np.clip(np.rint(hu + 1024), 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient_id, "CT"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(position) * 2.5]
    ds.InstanceNumber = int(position) + 1
    ds.PixelData = arr.tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


WRITERS = {"chexpert": write_chexpert, "ddsm": write_ddsm, "cbis_ddsm": write_cbis_ddsm, "isic2019": write_isic2019,
           "aptos2019": write_aptos2019, "nih_chestxray14": write_nih_chestxray14,
           "chest_xray_pneumonia": write_chest_xray_pneumonia, "ham10000": write_ham10000, "isic2018": write_isic2018,
           "ichallenge_amd": write_ichallenge_amd, "brain_tumor_figshare": write_brain_tumor_figshare,
           "csv": write_csv_dataset, "folder": write_folder, "volumes": write_volumes}


def _write_into(name: str, root: str, num: int, seed: int, size: int) -> dict:
    if name not in WRITERS:
        raise DataError(f"no fake writer for {name!r}; known: {', '.join(WRITERS)}")
    if num < 1:
        raise DataError(f"num must be positive, got {num}")
    os.makedirs(root, exist_ok=True)
    try:
        images = WRITERS[name](root, num, np.random.default_rng(seed), size)
    except OSError as e:
        if e.filename is not None:
            raise
        shown = os.path.join(os.path.dirname(root), os.path.basename(root).split(".tmp-")[0].lstrip("."))
        raise OSError(e.errno, e.strerror or str(e), shown) from e  # Pillow's writes name no file
    return {"dataset": name, "root": os.path.abspath(root), "images": images, "seed": seed, "size": size}


def write(name: str, root: str, num: int, seed: int = 0, size: int = 64) -> dict:
    """Writes `num` synthetic images of dataset `name` in its public layout under `root`; returns a summary.

    `root` must be new or an empty folder: a dataset (or anything else) already there is never overwritten. The
    files are written into a temporary folder beside `root` and renamed onto it when complete, so a killed or failed
    write leaves no half dataset at `root`."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"{root}: is a file; expected a folder to write the synthetic {name} dataset into")
    if os.path.isdir(root) and os.listdir(root):
        held = sorted(os.listdir(root))
        raise DataError(f"{root}: not empty ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}); the synthetic "
                        f"{name} dataset is written into a new or empty folder only, never over existing files")
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        summary = _write_into(name, tmp, num, seed, size)
        os.rename(tmp, root)  # onto an absent or empty folder: atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "root": root}


def write_once(name: str, root: str, num: int, seed: int = 0, size: int = 64) -> dict:
    """Writes the synthetic dataset to `root` once, atomically, and reuses it afterwards; safe when several
    processes or users call it at the same time (the demo, concurrent runs).

    The data is written to a fresh temporary folder beside `root` and renamed to `root` in one step, so `root`
    is either absent or complete. A writer that loses the race deletes its copy and uses the winner's. `root`
    then holds `MARKER` with (dataset, num, seed, size); a later call with other values is a DataError rather
    than a silent reuse. A `root` that exists without the marker (your own data) is used as it is.
    Returns write()'s summary plus 'written': whether this call wrote the data.
    """
    root = os.path.abspath(os.path.expanduser(root))
    want = {"dataset": name, "num": num, "seed": seed, "size": size}

    def reuse() -> dict:
        marker = os.path.join(root, MARKER)
        if not os.path.isfile(marker):
            log.warning("%s exists and was not written by medjax's synthetic-data writer; using it as it is", root)
            return {"dataset": name, "root": root, "images": None, "seed": seed, "size": size, "written": False}
        with open(marker) as f:
            have = json.load(f)
        if have.get("asked") != want:
            raise DataError(f"{root}: holds synthetic data written with {have.get('asked')}, not {want}; remove the "
                            "folder or point the data root elsewhere")
        return {**have["summary"], "written": False}

    if os.path.isdir(root) and os.listdir(root):
        return reuse()
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        summary = _write_into(name, tmp, num, seed, size)
        summary["root"] = root
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"asked": want, "summary": summary}, f)
        try:
            os.rename(tmp, root)  # atomic; fails if another writer's complete folder is already there
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.isdir(root):
                raise DataError(f"{root}: cannot move the synthetic data into place ({e.strerror or e})") from None
            return reuse()
        return {**summary, "written": True}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
