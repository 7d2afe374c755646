"""SynthSegMONAI: SynthSeg brain MRI segmentation (any contrast, any resolution) in 3D Slicer.

The widget is thin: everything that touches data lives in the Qt-free
``SynthSegMONAISlicerLib`` package; inference runs in a child process with Slicer's Python
(the engine's command line), so the GUI stays responsive and Cancel can stop it.
"""

from __future__ import annotations

import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # slicer-core: no translations
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

from SynthSegMONAISlicerLib.slicer_version import refuse_old_slicer

# Before anything that needs a recent Slicer (Python >= 3.10, vtkSegment::SetTerminology):
# on an older one the user gets a clear message instead of a traceback.
refuse_old_slicer(slicer, "SynthSeg MONAI")

from SynthSegMONAISlicerLib import dependencies, models, parameters  # noqa: E402
from SynthSegMONAISlicerLib.errors import SegmentationError  # noqa: E402
from SynthSegMONAISlicerLib.job_state import JobState  # noqa: E402
from SynthSegMONAISlicerLib.options import SegmentOptions  # noqa: E402
from SynthSegMONAISlicerLib.qc_table import lowest_score  # noqa: E402
from SynthSegMONAISlicerLib.segment_job import SegmentationJob, SegmentationResult  # noqa: E402
from SynthSegMONAISlicerLib.statistics_table import export_csv  # noqa: E402

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "SynthSegMONAI.term.json")
DOCUMENTATION_URL = "https://github.com/SynthSegMONAI/SlicerSynthSegMONAI#using-synthseg-monai-in-3d-slicer"

# Sample Data: the Colin27 T1 scan of the repository's Testing/Data (1.4 MB), downloaded on demand.
SAMPLE_CATEGORY = "SynthSeg MONAI"
SAMPLE_NAME = "SynthSegColin27T1"
SAMPLE_FILE = "sample_t1_colin27.nii.gz"
SAMPLE_URL = ("https://raw.githubusercontent.com/SynthSegMONAI/SlicerSynthSegMONAI/main/Testing/Data/"
              + SAMPLE_FILE)
SAMPLE_SHA256 = "bef9b34d56baa81c39b1712fb4defadaf5235327c4565dfa2283a4b45ec006fa"
SAMPLE_NODE_NAME = "Colin27 T1"
SAMPLE_THUMBNAIL = os.path.join(MODULE_DIR, "Resources", "Icons", "SynthSegMONAISampleColin27.png")

CITATION = (
    "B Billot, DN Greve, O Puonti, A Thielscher, K Van Leemput, B Fischl, AV Dalca, "
    "JE Iglesias. SynthSeg: Segmentation of brain MRI scans of any contrast and resolution "
    "without retraining. Medical Image Analysis 86, 102789 (2023).<br>"
    "B Billot, C Magdamo, Y Cheng, SE Arnold, S Das, JE Iglesias. Robust machine learning "
    "segmentation for large-scale analysis of heterogeneous clinical brain MRI datasets. "
    "PNAS 120(9), e2216399120 (2023)."
)


class SynthSegMONAI(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SynthSeg MONAI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SynthSeg-MONAI contributors"]
        self.parent.helpText = _(
            "Segments the brain into 32 structures (plus CSF) from an MRI of any contrast and "
            "resolution, with SynthSeg running on PyTorch/MONAI.<br><br>"
            "<b>How to:</b> 1. load a brain MRI (or the <i>Colin27 T1</i> scan from the Sample Data "
            "module); 2. pick it as <i>Input volume</i>; 3. choose a model (or import FreeSurfer's "
            "<tt>synthseg_2.0.h5</tt> once with <i>Import SynthSeg .h5 from FreeSurfer...</i>); "
            "4. click <b>Segment</b>. The result is a segmentation named after the input, with "
            "FreeSurfer names, colours, label values and SNOMED codes, and a table of structure "
            "volumes (mm<sup>3</sup>, mL, % of intracranial volume). Click <b>Cancel</b> to stop "
            "a run.<br><br>"
            "SynthSeg 2.0 options: <i>Cortical parcellation</i> replaces the cerebral cortex by 68 "
            "named parcels (FreeSurfer's ctx-lh-*/ctx-rh-*); <i>Robust model</i> for clinical scans "
            "with large slice spacing; <i>CT scan</i> for CT in Hounsfield units; <i>Quality "
            "control</i> adds a table of QC scores (0 to 1, higher is better).<br><br>"
            "From Python: <tt>import SynthSegMONAI; seg, table = "
            "SynthSegMONAI.SynthSegMONAILogic().segment(volumeNode)</tt>.<br><br>"
            "Documentation: <a href=\"{url}\">using SynthSeg-MONAI in 3D Slicer</a>.<br><br>"
            "If you use SynthSeg in your work, please cite:<br>").format(url=DOCUMENTATION_URL) + CITATION
        self.parent.acknowledgementText = _(
            "SynthSeg was developed by Benjamin Billot, Juan Eugenio Iglesias and colleagues "
            "(Martinos Center, MGH / Harvard Medical School; University College London). This "
            "extension re-implements its inference on PyTorch and MONAI; it builds on 3D Slicer "
            "and the SlicerPyTorch extension.")
        if hasattr(slicer, "app") and hasattr(slicer.app, "connect"):
            slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted() -> None:
    """Register the terminology and the sample scan once the application has started."""
    registerTerminology()
    registerSampleData()


def registerTerminology() -> None:
    """Load the module's terminology file (structures without a DICOM master list code)."""
    try:
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(TERMINOLOGY_FILE)
    except AttributeError:
        logging.debug("Terminologies module not available: custom terminology not loaded")


def registerSampleData() -> None:
    """Add the Colin27 T1 scan to the Sample Data module (downloaded and checked on first use)."""
    try:
        import SampleData
    except ImportError:
        logging.debug("Sample Data module not available: sample scan not registered")
        return
    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer >= 5.12
        logic.registerCustomSampleDataCategory(SAMPLE_CATEGORY, title=_("SynthSeg MONAI"))
    logic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=SAMPLE_THUMBNAIL,
        uris=SAMPLE_URL,
        fileNames=SAMPLE_FILE,
        checksums=f"SHA256:{SAMPLE_SHA256}",
        nodeNames=SAMPLE_NODE_NAME,
    )


class SynthSegMONAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin Qt panel over :class:`SynthSegMONAILogic`; drives a job's state machine."""

    ADD_MODEL = "__add_model_file__"
    IMPORT_H5 = "__import_h5__"
    DEFAULT_MODEL = ""
    DONE = _("Done.")
    PACKAGES_LATER = _("PyTorch and the other Python packages are not installed yet: they will be "
                       "installed when you click Segment.")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SynthSegMONAILogic | None = None
        self._parameterNode = None
        self._updatingGUI = False
        self._job: SegmentationJob | None = None
        self._state = JobState.IDLE
        self._timer = None

    # --- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SynthSegMONAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SynthSegMONAILogic()
        registerTerminology()  # also when the module is (re)loaded after startup

        for text, value in ((_("Auto (GPU if available)"), "auto"), (_("CPU"), "cpu"), (_("GPU (CUDA)"), "cuda")):
            self.ui.deviceComboBox.addItem(text, value)
        for text, value in ((_("Input volume's grid"), "input"), (_("1 mm (SynthSeg grid)"), "synthseg")):
            self.ui.outputGridComboBox.addItem(text, value)
        self.refreshModels()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for selector in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector,
                         self.ui.outputTableSelector, self.ui.outputQCTableSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.show3DButton.setSegmentationNode)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        for checkBox in self._optionCheckBoxes().values():
            checkBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.threadsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.outputGridComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.openModelFolderButton.connect("clicked(bool)", self.onOpenModelFolder)

        self.initializeParameterNode()
        self.setState(JobState.IDLE)

    def cleanup(self) -> None:
        if self._job is not None and not self._job.finished:
            self._job.cancel(wait=True)  # the module is going away: leave no process behind
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._state is JobState.SEGMENTING:
            self._job.cancel()
            self.setState(JobState.CANCELLING, _("Cancelling..."))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        node = self.logic.getParameterNode()
        if not node.GetNodeReference(parameters.INPUT_VOLUME):
            volume = self.logic.defaultInputVolume()
            if volume is not None:
                node.SetNodeReferenceID(parameters.INPUT_VOLUME, volume.GetID())
        self.setParameterNode(node)

    def setParameterNode(self, node) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            node = self._parameterNode
            options = parameters.load_options(node)
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference(parameters.INPUT_VOLUME))
            self.ui.outputSegmentationSelector.setCurrentNode(
                node.GetNodeReference(parameters.OUTPUT_SEGMENTATION))
            self.ui.outputTableSelector.setCurrentNode(node.GetNodeReference(parameters.OUTPUT_TABLE))
            self.ui.outputQCTableSelector.setCurrentNode(node.GetNodeReference(parameters.OUTPUT_QC_TABLE))
            index = self.ui.modelComboBox.findData(options.model)
            self.ui.modelComboBox.setCurrentIndex(max(index, 0))
            for field, checkBox in self._optionCheckBoxes().items():
                checkBox.checked = getattr(options, field)
            self.ui.outputQCTableSelector.enabled = options.qc and not self._busy()
            self.ui.deviceComboBox.setCurrentIndex(max(self.ui.deviceComboBox.findData(options.device), 0))
            self.ui.threadsSpinBox.value = options.threads
            self.ui.outputGridComboBox.setCurrentIndex(
                max(self.ui.outputGridComboBox.findData(options.output_grid), 0))
            self.ui.exportTableButton.enabled = node.GetNodeReference(parameters.OUTPUT_TABLE) is not None
            self._updateApplyButton()
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *args) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        node = self._parameterNode
        was = node.StartModify()
        try:
            for role, selector in ((parameters.INPUT_VOLUME, self.ui.inputVolumeSelector),
                                   (parameters.OUTPUT_SEGMENTATION, self.ui.outputSegmentationSelector),
                                   (parameters.OUTPUT_TABLE, self.ui.outputTableSelector),
                                   (parameters.OUTPUT_QC_TABLE, self.ui.outputQCTableSelector)):
                node.SetNodeReferenceID(role, selector.currentNodeID)
            parameters.save_options(node, self.currentOptions())
        finally:
            node.EndModify(was)

    def _optionCheckBoxes(self) -> dict:
        """SegmentOptions field -> its check box."""
        return {"fast": self.ui.fastCheckBox, "parc": self.ui.parcCheckBox, "robust": self.ui.robustCheckBox,
                "ct": self.ui.ctCheckBox, "qc": self.ui.qcCheckBox}

    def currentOptions(self) -> SegmentOptions:
        model = self.ui.modelComboBox.currentData
        return SegmentOptions(
            model=model if model not in (self.ADD_MODEL, self.IMPORT_H5, None) else "",
            device=self.ui.deviceComboBox.currentData or "auto",
            threads=self.ui.threadsSpinBox.value,
            output_grid=self.ui.outputGridComboBox.currentData or "input",
            **{field: bool(checkBox.checked) for field, checkBox in self._optionCheckBoxes().items()},
        )

    # --- models --------------------------------------------------------------------------
    def refreshModels(self, select: str | None = None) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            combo.addItem(_("Default model"), self.DEFAULT_MODEL)
            if not dependencies.torch_available():
                self.ui.modelInfoLabel.text = self.PACKAGES_LATER
            else:
                try:
                    for name, path in models.list_models():
                        combo.addItem(name, str(path))
                except ImportError:
                    self.ui.modelInfoLabel.text = self.PACKAGES_LATER
            combo.insertSeparator(combo.count)
            combo.addItem(_("Add model file..."), self.ADD_MODEL)
            combo.addItem(_("Import SynthSeg .h5 from FreeSurfer..."), self.IMPORT_H5)
            if select is not None:
                combo.setCurrentIndex(max(combo.findText(select), 0))
        finally:
            combo.blockSignals(wasBlocked)

    def onModelChanged(self, index: int) -> None:
        data = self.ui.modelComboBox.itemData(index)
        if data == self.ADD_MODEL:
            self._addModel(self._askFile(_("Model file"), _("SynthSeg-MONAI model (*.safetensors)")),
                           models.add_model_file)
        elif data == self.IMPORT_H5:
            self._addModel(self._askFile(_("SynthSeg Keras weights (FreeSurfer's models folder)"),
                                         _("SynthSeg weights (*.h5)")),
                           models.import_keras_model)
        else:
            self._showModelInfo(data)
            self.updateParameterNodeFromGUI()

    def _askFile(self, caption: str, filter: str) -> str:
        return qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), caption, "", filter)

    def _addModel(self, path: str, adder) -> None:
        if not path:
            self.updateGUIFromParameterNode()
            return
        try:
            self._ensureDependencies()
            with slicer.util.WaitCursor():
                name = adder(path)
        except (SegmentationError, dependencies.DependencyError) as e:
            slicer.util.errorDisplay(str(e))
            self.updateGUIFromParameterNode()
            return
        self.refreshModels(select=name)
        self.updateParameterNodeFromGUI()
        self._showModelInfo(self.ui.modelComboBox.currentData)

    def _showModelInfo(self, data) -> None:
        if not data:
            self.ui.modelInfoLabel.text = ""
            return
        if not dependencies.torch_available():
            self.ui.modelInfoLabel.text = self.PACKAGES_LATER
            return
        try:
            self.ui.modelInfoLabel.text = models.model_summary(data)
        except (SegmentationError, ImportError) as e:
            self.ui.modelInfoLabel.text = str(e)

    def onOpenModelFolder(self) -> None:
        folder = models.user_model_folder()
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # --- dependencies --------------------------------------------------------------------
    def _ensureDependencies(self) -> None:
        """Install what is missing, after asking; raises DependencyError (message for the user)."""
        dependencies.ensure_all(MODULE_DIR, lambda text: slicer.util.confirmOkCancelDisplay(text),
                                requester="SynthSegMONAI")

    def onInstallDependencies(self) -> None:
        try:
            self._ensureDependencies()
        except dependencies.DependencyError as e:
            slicer.util.errorDisplay(str(e))
            return
        self.refreshModels()
        self.updateGUIFromParameterNode()
        slicer.util.infoDisplay(_("All required Python packages are installed."))

    # --- run -----------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._state is JobState.SEGMENTING:
            # Returns at once; the timer sees the process tree gone and finishes the cancel.
            self._job.cancel()
            self.setState(JobState.CANCELLING, _("Cancelling..."))
            return
        self.ui.logTextEdit.clear()
        try:
            self._ensureDependencies()
        except dependencies.DependencyError as e:
            self.setState(JobState.FAILED, str(e))
            slicer.util.errorDisplay(str(e))
            return
        node = self._parameterNode
        self._job = self.logic.startSegmentation(
            self.ui.inputVolumeSelector.currentNode(), self.currentOptions(),
            segmentationNode=node.GetNodeReference(parameters.OUTPUT_SEGMENTATION),
            tableNode=node.GetNodeReference(parameters.OUTPUT_TABLE),
            qcTableNode=node.GetNodeReference(parameters.OUTPUT_QC_TABLE),
            onProgress=self.onProgress, onLog=self.onLog, start=False)
        try:
            self._job.start()
        except SegmentationError as e:
            self.setState(JobState.FAILED, str(e))
            slicer.util.errorDisplay(str(e))
            return
        self.setState(JobState.SEGMENTING, _("Segmenting..."))
        self._timer.start()

    def onTimer(self) -> None:
        if self._job is None:
            self._timer.stop()
            return
        state = self._job.poll()
        if state is JobState.IMPORTING:
            self.setState(JobState.IMPORTING, _("Importing results..."))
        if not self._job.finished:
            return
        self._timer.stop()
        if state is JobState.DONE:
            self._showResult(self._job.result)
            self.setState(JobState.IDLE, self._doneMessage(self._job.result))
            self.ui.progressBar.value = 100
        elif state is JobState.FAILED:
            self.setState(JobState.FAILED, self._job.error)
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=self._job.error))
        else:
            self.setState(JobState.IDLE, _("Cancelled."))

    def _showResult(self, result: SegmentationResult) -> None:
        node = self._parameterNode
        was = node.StartModify()
        node.SetNodeReferenceID(parameters.OUTPUT_SEGMENTATION, result.segmentation_node.GetID())
        node.SetNodeReferenceID(parameters.OUTPUT_TABLE, result.table_node.GetID())
        if result.qc_table_node is not None:
            node.SetNodeReferenceID(parameters.OUTPUT_QC_TABLE, result.qc_table_node.GetID())
        node.EndModify(was)
        volume = self.ui.inputVolumeSelector.currentNode()
        slicer.util.setSliceViewerLayers(background=volume)
        self.logic.showTable(result.table_node)

    def _doneMessage(self, result: SegmentationResult) -> str:
        """``Done.``, with the lowest QC score when QC was asked."""
        lowest = lowest_score(result.qc_scores or {})
        if lowest is None:
            return self.DONE
        return _("Done. Lowest QC score: {score:.2f} ({group}).").format(score=lowest[1], group=lowest[0])

    def onProgress(self, fraction: float, stage: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        if stage:
            self.ui.statusLabel.text = _("{stage}...").format(stage=stage.capitalize())

    def onLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onExportTable(self) -> None:
        table = self._parameterNode.GetNodeReference(parameters.OUTPUT_TABLE) if self._parameterNode else None
        if table is None:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export volumes"),
                                              f"{table.GetName()}.csv", _("CSV files (*.csv)"))
        if path:
            export_csv(table, path)

    def _busy(self) -> bool:
        return self._state in (JobState.SEGMENTING, JobState.IMPORTING, JobState.CANCELLING)

    def setState(self, state: JobState, message: str | None = None) -> None:
        """Enable/disable controls for ``state`` (idle, segmenting, importing, cancelling, failed)."""
        self._state = state
        busy = self._busy()
        for widget in (self.ui.inputVolumeSelector, self.ui.modelComboBox, *self._optionCheckBoxes().values(),
                       self.ui.deviceComboBox, self.ui.threadsSpinBox, self.ui.outputGridComboBox,
                       self.ui.outputSegmentationSelector, self.ui.outputTableSelector,
                       self.ui.installDependenciesButton):
            widget.enabled = not busy
        self.ui.outputQCTableSelector.enabled = not busy and bool(self.ui.qcCheckBox.checked)
        if state is JobState.SEGMENTING:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation (nothing is added to the scene).")
            self.ui.applyButton.enabled = True
        elif state is JobState.CANCELLING:
            self.ui.applyButton.text = _("Cancelling...")
            self.ui.applyButton.toolTip = _("Stopping the segmentation engine.")
            self.ui.applyButton.enabled = False
        else:
            self.ui.applyButton.text = _("Segment")
            self.ui.applyButton.toolTip = _("Run SynthSeg on the input volume.")
            self._updateApplyButton()
            if busy:
                self.ui.applyButton.enabled = False
        if not busy and state is not JobState.FAILED:
            self.ui.progressBar.value = 100 if message == self.DONE else 0
        if message is not None:
            self.ui.statusLabel.text = message

    def _updateApplyButton(self) -> None:
        if self._state in (JobState.SEGMENTING, JobState.CANCELLING):
            return
        has_input = self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.applyButton.enabled = has_input
        self.ui.applyButton.toolTip = (_("Run SynthSeg on the input volume.") if has_input
                                       else _("Select an input volume first."))


class SynthSegMONAILogic(ScriptedLoadableModuleLogic):
    """Scripting API: ``SynthSegMONAILogic().segment(volumeNode)`` -> (segmentation, table).

    Usable from Slicer's Python console and from other modules; the work is done by the
    Qt-free ``SynthSegMONAISlicerLib`` (inference in a child process).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.tempRoot: str | None = None  # None: the system's temporary folder
        self.lastResult: SegmentationResult | None = None  # of the last segment() call (QC table, scores)

    def setDefaultParameters(self, parameterNode) -> None:
        parameters.set_defaults(parameterNode)

    def getParameterNode(self):
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        parameters.set_defaults(node)
        return node

    def defaultInputVolume(self):
        """The volume shown in the slice views' background, else the last scalar volume."""
        try:
            for name in slicer.app.layoutManager().sliceViewNames():
                composite = slicer.app.layoutManager().sliceWidget(name).mrmlSliceCompositeNode()
                node = slicer.mrmlScene.GetNodeByID(composite.GetBackgroundVolumeID() or "")
                if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
                    return node
        except AttributeError:
            pass
        volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        return volumes[-1] if volumes else None

    def startSegmentation(self, volumeNode, options: SegmentOptions | None = None,
                          segmentationNode=None, tableNode=None, onProgress=None, onLog=None,
                          start: bool = True, qcTableNode=None) -> SegmentationJob:
        """Start segmenting in the background; poll the returned job (or call its ``wait``)."""
        job = SegmentationJob(slicer.mrmlScene, volumeNode, options, segmentation_node=segmentationNode,
                              table_node=tableNode, qc_table_node=qcTableNode, on_progress=onProgress,
                              on_log=onLog, temp_root=self.tempRoot)
        if start:
            job.start()
        return job

    def segment(self, volumeNode, model: str = "", fast: bool = False, device: str = "auto",
                threads: int = 0, outputGrid: str = "input", segmentationNode=None,
                tableNode=None, timeout: float | None = None, parc: bool = False,
                robust: bool = False, ct: bool = False, qc: bool = False, qcTableNode=None):
        """Segment ``volumeNode`` and wait; returns (segmentation node, volume table node).

        SynthSeg 2.0's options: ``parc`` (cortical parcels), ``robust`` (robust model), ``ct``
        (CT scan), ``qc`` (QC scores: table in ``self.lastResult.qc_table_node``). Raises
        ``SegmentationError`` with a message for the user if anything goes wrong; the scene is
        then left unchanged.
        """
        options = SegmentOptions(model=model, fast=fast, device=device, threads=threads,
                                 output_grid=outputGrid, parc=parc, robust=robust, ct=ct, qc=qc)
        job = self.startSegmentation(volumeNode, options, segmentationNode, tableNode,
                                     onLog=lambda text: logging.info(text), qcTableNode=qcTableNode)
        result = job.wait(timeout)
        self.lastResult = result
        return result.segmentation_node, result.table_node

    def showTable(self, tableNode) -> None:
        """Show ``tableNode`` in a layout with a table view (GUI only)."""
        layoutManager = getattr(slicer.app, "layoutManager", lambda: None)()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


class SynthSegMONAITest(ScriptedLoadableModuleTest):
    """Self-test for the Slicer application, on the MRHead sample.

    The scene side (segmentation import, terminology, volume table) needs no PyTorch and is
    always tested; segmenting with a tiny model runs only where PyTorch and the other packages
    are installed (Slicer's test machines have none), and says so when it is skipped.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SynthSegMONAI_SceneSide()
        self.setUp()
        self.test_SynthSegMONAI_MRHead()

    def _loadMRHead(self):
        import SampleData

        self.delayDisplay(_("Loading MRHead"))
        return SampleData.downloadSample("MRHead")

    def test_SynthSegMONAI_SceneSide(self) -> None:
        """A label map on MRHead's grid becomes a named, coded segmentation; volumes become a table."""
        from SynthSegMONAISlicerLib import testing
        from SynthSegMONAISlicerLib.segmentation_import import import_labelmap, terminology_entry
        from SynthSegMONAISlicerLib.statistics_table import fill_table, table_rows, volume_report
        from SynthSegMONAISlicerLib.volume_export import check_input_volume, ijk_to_world

        volume = self._loadMRHead()
        check_input_volume(volume)
        shape = volume.GetImageData().GetDimensions()
        labels = testing.label_blocks(shape)
        seg = import_labelmap(slicer.mrmlScene, labels, ijk_to_world(volume), f"{volume.GetName()} SynthSeg",
                              reference_volume=volume)
        segmentation = seg.GetSegmentation()
        found = {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegment(i)
                 for i in range(segmentation.GetNumberOfSegments())}
        self.assertEqual(sorted(found), sorted(testing.BLOCK_LABELS))
        self.assertEqual(found[17].GetName(), "Left-Hippocampus")
        for label, segment in found.items():
            self.assertEqual(segment.GetTerminology(), terminology_entry(label))
        modifier = 3  # field of the type modifier in a terminology entry
        self.assertEqual(found[17].GetTerminology().split("~")[modifier], "SCT^7771000^Left")
        # no laterality for cerebellar white matter in the DICOM master list
        self.assertEqual(found[7].GetTerminology().split("~")[modifier], "^^")

        volumes = {label: 1000.0 * (i + 1) for i, label in enumerate(sorted(testing.BLOCK_LABELS))}
        report = volume_report(sorted(volumes), [volumes[label] for label in sorted(volumes)],
                               sum(volumes.values()))
        table = fill_table(slicer.mrmlScene, report, f"{volume.GetName()} SynthSeg volumes")
        rows = table_rows(table)
        self.assertEqual([r["Label"] for r in rows], sorted(volumes))
        self.assertAlmostEqual(rows[0]["Volume [mL]"], volumes[rows[0]["Label"]] / 1000.0)
        self.delayDisplay(_("Scene side passed"))

    def test_SynthSegMONAI_MRHead(self) -> None:
        """Segment MRHead with a tiny model (needs PyTorch and the module's Python packages)."""
        if not dependencies.torch_available():
            self.delayDisplay(_("PyTorch is not installed: the segmentation part of the self-test is "
                                "skipped (install the PyTorch extension, then PyTorch, to run it)."))
            return
        requirements = dependencies.read_requirements(dependencies.requirements_file(MODULE_DIR))
        missing = dependencies.missing_requirements(requirements)
        if missing:
            self.delayDisplay(_("Python packages missing: the segmentation part of the self-test is "
                                "skipped ({packages}).").format(packages=", ".join(missing)))
            return
        import tempfile

        from SynthSegMONAISlicerLib import testing
        from SynthSegMONAISlicerLib.segmentation_import import segment_name

        volume = self._loadMRHead()
        logic = SynthSegMONAILogic()
        with tempfile.TemporaryDirectory() as folder:
            # A tiny model with predictable output: the test checks the plumbing, not accuracy.
            modelPath = testing.make_tiny_model(os.path.join(folder, "tiny_selftest.safetensors"))
            self.delayDisplay(_("Segmenting (CPU)"))
            seg, table = logic.segment(volume, model=str(modelPath), device="cpu", timeout=900)
        segmentation = seg.GetSegmentation()
        self.assertGreater(segmentation.GetNumberOfSegments(), 0)
        names = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i).GetLabelValue()
                 for i in range(segmentation.GetNumberOfSegments())}
        for name, value in names.items():
            self.assertEqual(name, segment_name(value))
            self.assertFalse(name.startswith("Label "))  # a structure of the label table
        self.assertEqual(table.GetNumberOfRows(), len(testing.PHANTOM_LEVELS) - 1)
        self.assertTrue(seg.GetName().startswith(volume.GetName()))
        self.delayDisplay(_("Test passed"))
