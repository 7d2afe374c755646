"""Every segment's terminology entry against Slicer's DICOM master list, read by Slicer's own
terminology logic (slicer-core): the type must exist, and a laterality modifier may be given
only where the master list defines one for that type.

slicer-core does not ship the master list itself: the test reads the extract in
``Testing/Data/terminology`` (the master list's entries for the label table's codes, unchanged;
see the README there). The module's own terminology file is checked the same way.
"""

from __future__ import annotations

import json

import pytest
import slicer
from slicer_fixtures import MODULE_DIR, REPO

from SynthSegMONAILib import labels as label_table
from SynthSegMONAISlicerLib.segmentation_import import (
    DICOM_CONTEXT,
    LATERALITY_CODES,
    TYPES_WITHOUT_MODIFIERS,
    terminology_entry,
)

MASTER_EXTRACT = REPO / "Testing" / "Data" / "terminology" / \
    "SegmentationCategoryTypeModifier-DICOM-Master-brain-extract.json"
CUSTOM_FILE = MODULE_DIR / "Resources" / "SynthSegMONAI.term.json"
STRUCTURES = [s for s in label_table.all_structures() if s.label]


@pytest.fixture(scope="module")
def logic():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(MASTER_EXTRACT)) == DICOM_CONTEXT
    assert logic.LoadTerminologyFromFile(str(CUSTOM_FILE))
    return logic


def _entry(logic, text: str):
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(text, entry), text
    return entry


def _modifiers(logic, entry) -> set[str]:
    """Codes of the modifiers the loaded terminology defines for the entry's type."""
    fields = _serialized(entry).split("~")
    fields[3] = "^^"  # the type alone, whatever modifier the entry carries
    bare = _entry(logic, "~".join(fields))
    name = bare.GetTerminologyContextName()
    assert logic.UpdateEntryFromLoadedTerminologies(bare, [name], [])
    category, type_ = bare.GetCategoryObject(), bare.GetTypeObject()
    if not type_.GetHasModifiers():
        return set()
    out = set()
    modifier = slicer.vtkSlicerTerminologyType()
    for i in range(logic.GetNumberOfTypeModifiersInTerminologyType(name, category, type_)):
        logic.GetNthTypeModifierInTerminologyType(name, category, type_, i, modifier)
        out.add(f"{modifier.GetCodingSchemeDesignator()}^{modifier.GetCodeValue()}")
    return out


def _serialized(entry) -> str:
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def test_the_extract_holds_every_code_of_the_label_table():
    doc = json.loads(MASTER_EXTRACT.read_text())
    assert doc["SegmentationCategoryTypeContextName"] == DICOM_CONTEXT
    codes = {t["CodeValue"] for c in doc["SegmentationCodes"]["Category"] for t in c["Type"]}
    assert {s.snomed_code for s in STRUCTURES if s.snomed_code} <= codes


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.freesurfer_name)
def test_entry_type_and_modifier_exist_in_the_loaded_terminology(logic, structure):
    text = terminology_entry(structure.label)
    entry = _entry(logic, text)
    type_ = entry.GetTypeObject()
    code, meaning = type_.GetCodeValue(), type_.GetCodeMeaning()
    # Slicer finds the type in the named context (it then fills in the meaning it has there)
    type_.SetCodeMeaning("")
    assert logic.UpdateEntryFromLoadedTerminologies(entry, [entry.GetTerminologyContextName()], [])
    assert type_.GetCodeValue() == code
    assert type_.GetCodeMeaning().lower() == meaning.lower() == structure.snomed_meaning.lower()
    allowed = _modifiers(logic, entry)
    modifier = entry.GetTypeModifierObject()
    given = f"{modifier.GetCodingSchemeDesignator()}^{modifier.GetCodeValue()}" if modifier.GetCodeValue() else ""
    if not allowed:
        assert given == "", f"{structure.freesurfer_name}: the master list has no modifier for this type"
    elif structure.laterality:
        expected = "^".join(LATERALITY_CODES[structure.laterality].split("^")[:2])
        assert given == expected and given in allowed
    else:
        assert given == "" or given in allowed


def test_cerebellar_white_matter_has_no_laterality(logic):
    for label in (7, 46):
        entry = _entry(logic, terminology_entry(label))
        assert not entry.GetTypeModifierObject().GetCodeValue()
        assert not _modifiers(logic, entry)


def test_types_without_modifiers_are_exactly_those_of_the_master_list(logic):
    without = set()
    for s in STRUCTURES:
        if s.snomed_code:
            entry = _entry(logic, terminology_entry(s.label))
            if not _modifiers(logic, entry):
                without.add(s.snomed_code)
    assert without == TYPES_WITHOUT_MODIFIERS
