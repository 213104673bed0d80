"""A native launcher for compiled kernels: one C call from Python to the kernel.

Through ctypes a kernel call costs about 1 us of argument conversion, plus a Python
`data_ptr()` call per tensor. The launcher is a small CPython extension, built once per
machine and Python (cached like the kernels), whose `bind(address, tensors, scalars)`
returns a callable: called with the kernel's tensors, it reads their data pointers in C
(through the function torch exports for this, `_torchinductor_pyobject_tensor_data_ptr`)
and calls the kernel's packed entry point (`codegen.PACKED_NAME`:
`int32_t f(void* const* pointers, const int64_t* scalars)`) with the scalars bound once.
Before that it checks the first tensors' dtype, device, shape and strides against those
bound (the layouts the kernel was generated for). It returns the kernel's error code, or
LAYOUT_MISMATCH without running when a check fails (the caller applies the full rule).

The extension also makes tapes (runtime/tape.py): `record(list)` has every launch of the
recording thread append what it ran (its entry point, data pointers, scalars and return
code) until `record(None)`; `tape(entries[, patches])` returns a callable that runs such
launches and Python callables in order, in one C loop. `patches` are (entry, pointer,
buffer, offset): the tape then takes one address a buffer, and before running sets each
patched pointer to its buffer's address plus the offset (outputs written into fresh memory
each call, runtime/tape.py).

Where the extension cannot be built (no Python headers, no compiler) or torch lacks the
data-pointer function, `module()` is None and kernels are called through ctypes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

from memopt.backends.cpp import build

# The most tensors one call passes (inputs, outputs and output snapshots); a kernel with
# more is called through ctypes.
MAX_TENSORS = 64
LAYOUT_MISMATCH = -1  # the launch's return when a checked tensor's layout differs

SOURCE = r"""
// memopt's kernel launcher: a CPython extension (see memopt/backends/cpp/launcher.py).
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cstdint>
#include <exception>

#define MAX_TENSORS @MAX_TENSORS@

typedef int32_t (*packed_fn)(void* const*, const int64_t*);
typedef void* (*data_ptr_fn)(PyObject*);
static data_ptr_fn tensor_data_ptr = nullptr;

// Returned when a checked tensor's layout is not the expected one (the kernel did not
// run): the caller applies the full rule and, if the tensor passes, calls unchecked.
#define LAYOUT_MISMATCH (-1)

static PyObject *dtype_name, *is_cpu_name, *shape_name, *stride_name, *version_name,
    *is_neg_name, *is_conj_name;

// While set (`record(list)`), every launch the recording thread makes appends (address,
// pointers, scalars, code) to this list: what it ran, for a tape (runtime/tape.py).
static PyObject* recording = nullptr;
static PyThreadState* recording_thread = nullptr;

typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  packed_fn fn;
  Py_ssize_t tensors;
  Py_ssize_t scalar_count;
  int64_t* scalars;
  PyObject* checks;  // a tuple of (dtype, shape, strides) for the first tensors
} Launch;

// 1 when the tensor has the dtype, is on the CPU and has the shape and strides; 0 when
// not; -1 with an exception set when an attribute cannot be read.
static int matches(PyObject* tensor, PyObject* check) {
  PyObject* value = PyObject_GetAttr(tensor, dtype_name);
  if (value == nullptr) return -1;
  int same = value == PyTuple_GET_ITEM(check, 0);
  Py_DECREF(value);
  if (!same) return 0;
  value = PyObject_GetAttr(tensor, is_cpu_name);
  if (value == nullptr) return -1;
  same = value == Py_True;
  Py_DECREF(value);
  if (!same) return 0;
  value = PyObject_GetAttr(tensor, shape_name);
  if (value == nullptr) return -1;
  same = PyObject_RichCompareBool(value, PyTuple_GET_ITEM(check, 1), Py_EQ);
  Py_DECREF(value);
  if (same != 1) return same;
  value = PyObject_CallMethodNoArgs(tensor, stride_name);
  if (value == nullptr) return -1;
  same = PyObject_RichCompareBool(value, PyTuple_GET_ITEM(check, 2), Py_EQ);
  Py_DECREF(value);
  return same;
}

static void* pointer_of(PyObject* tensor) {
  try {
    return tensor_data_ptr(tensor);
  } catch (...) {
    PyErr_SetString(PyExc_TypeError, "memopt launcher: an argument is not a tensor");
    return nullptr;
  }
}

static PyObject* launch_call(PyObject* self, PyObject* const* args, size_t nargsf,
                             PyObject* kwnames) {
  Launch* launch = (Launch*)self;
  Py_ssize_t n = PyVectorcall_NARGS(nargsf);
  if (n != launch->tensors || (kwnames && PyTuple_GET_SIZE(kwnames))) {
    PyErr_Format(PyExc_TypeError, "memopt launcher: expected %zd tensors, got %zd",
                 launch->tensors, n);
    return nullptr;
  }
  Py_ssize_t checked = PyTuple_GET_SIZE(launch->checks);
  for (Py_ssize_t k = 0; k < checked && k < n; ++k) {
    int same = matches(args[k], PyTuple_GET_ITEM(launch->checks, k));
    if (same < 0) return nullptr;
    if (!same) return PyLong_FromLong(LAYOUT_MISMATCH);
  }
  void* pointers[MAX_TENSORS];
  for (Py_ssize_t k = 0; k < n; ++k) {
    pointers[k] = pointer_of(args[k]);
    if (pointers[k] == nullptr && PyErr_Occurred()) return nullptr;
  }
  int32_t code = launch->fn(pointers, launch->scalars);
  if (recording != nullptr && PyThreadState_Get() == recording_thread) {
    PyObject* addresses = PyTuple_New(n);
    PyObject* scalars = PyTuple_New(launch->scalar_count);
    if (addresses == nullptr || scalars == nullptr) {
      Py_XDECREF(addresses);
      Py_XDECREF(scalars);
      return nullptr;
    }
    for (Py_ssize_t k = 0; k < n + launch->scalar_count; ++k) {
      PyObject* value = k < n ? PyLong_FromVoidPtr(pointers[k])
                              : PyLong_FromLongLong(launch->scalars[k - n]);
      if (value == nullptr) {
        Py_DECREF(addresses);
        Py_DECREF(scalars);
        return nullptr;
      }
      PyTuple_SET_ITEM(k < n ? addresses : scalars, k < n ? k : k - n, value);
    }
    PyObject* entry = Py_BuildValue("(KNNi)", (unsigned long long)(uintptr_t)launch->fn,
                                    addresses, scalars, (int)code);
    if (entry == nullptr || PyList_Append(recording, entry) < 0) {
      Py_XDECREF(entry);
      return nullptr;
    }
    Py_DECREF(entry);
  }
  return PyLong_FromLong(code);
}

// A tape: launches and Python calls run in order by one call (runtime/tape.py). A launch
// entry is (address, pointers, scalars): the packed entry point called with pointers and
// scalars fixed when the tape was made; any other entry is a callable taking nothing.
// A patch (entry, pointer, buffer, offset) sets that launch pointer, before each run, to
// the address the call passes for the buffer plus the offset: a tape with patches takes
// one address a buffer, one without takes nothing.
// Calling the tape returns None, or (position, code) for the first launch that returned a
// nonzero code (the entries after it not run); a Python entry's exception propagates.
typedef struct {
  packed_fn fn;
  void** pointers;
  int64_t* scalars;
  PyObject* call;  // a Python entry, or nullptr for a launch
} TapeEntry;

typedef struct {
  Py_ssize_t entry, pointer, buffer;
  int64_t offset;
} TapePatch;

typedef struct {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  Py_ssize_t count;
  TapeEntry* entries;
  Py_ssize_t patch_count;
  TapePatch* patches;
  Py_ssize_t buffers;  // the addresses a call takes: 1 + the patches' largest buffer
} Tape;

static PyObject* tape_call(PyObject* self, PyObject* const* args, size_t nargsf,
                           PyObject* kwnames) {
  Tape* tape = (Tape*)self;
  Py_ssize_t n = PyVectorcall_NARGS(nargsf);
  if (n != tape->buffers || (kwnames && PyTuple_GET_SIZE(kwnames))) {
    PyErr_Format(PyExc_TypeError, "memopt tape: takes %zd addresses, got %zd", tape->buffers, n);
    return nullptr;
  }
  for (Py_ssize_t k = 0; k < tape->patch_count; ++k) {
    const TapePatch* patch = &tape->patches[k];
    void* base = PyLong_AsVoidPtr(args[patch->buffer]);
    if (base == nullptr && PyErr_Occurred()) return nullptr;
    tape->entries[patch->entry].pointers[patch->pointer] = (char*)base + patch->offset;
  }
  for (Py_ssize_t k = 0; k < tape->count; ++k) {
    TapeEntry* entry = &tape->entries[k];
    if (entry->call != nullptr) {
      PyObject* result = PyObject_CallNoArgs(entry->call);
      if (result == nullptr) return nullptr;
      Py_DECREF(result);
      continue;
    }
    int32_t code = entry->fn(entry->pointers, entry->scalars);
    if (code != 0) return Py_BuildValue("(ni)", k, (int)code);
  }
  Py_RETURN_NONE;
}

static void tape_free_entries(Tape* tape) {
  for (Py_ssize_t k = 0; k < tape->count; ++k) {
    PyMem_Free(tape->entries[k].pointers);
    PyMem_Free(tape->entries[k].scalars);
    Py_XDECREF(tape->entries[k].call);
  }
  PyMem_Free(tape->entries);
  PyMem_Free(tape->patches);
}

static void tape_dealloc(PyObject* self) {
  tape_free_entries((Tape*)self);
  Py_TYPE(self)->tp_free(self);
}

static PyTypeObject TapeType = {PyVarObject_HEAD_INIT(nullptr, 0)};

static int int64s_of(PyObject* values, int64_t** out, int as_pointers) {
  Py_ssize_t n = PyTuple_GET_SIZE(values);
  *out = (int64_t*)PyMem_Malloc(sizeof(int64_t) * (n + 1));
  if (*out == nullptr) {
    PyErr_NoMemory();
    return -1;
  }
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* value = PyTuple_GET_ITEM(values, k);
    (*out)[k] = as_pointers ? (int64_t)(intptr_t)PyLong_AsVoidPtr(value) : PyLong_AsLongLong(value);
    if (PyErr_Occurred()) return -1;
  }
  return 0;
}

static PyObject* make_tape(PyObject* module, PyObject* args) {
  PyObject* entries;
  PyObject* patches = nullptr;
  if (!PyArg_ParseTuple(args, "O!|O!", &PyList_Type, &entries, &PyTuple_Type, &patches))
    return nullptr;
  Py_ssize_t count = PyList_GET_SIZE(entries);
  Tape* tape = PyObject_New(Tape, &TapeType);
  if (tape == nullptr) return nullptr;
  tape->vectorcall = tape_call;
  tape->count = 0;
  tape->patch_count = 0;
  tape->patches = nullptr;
  tape->buffers = 0;
  tape->entries = (TapeEntry*)PyMem_Calloc(count + 1, sizeof(TapeEntry));
  if (tape->entries == nullptr) {
    Py_DECREF(tape);
    return PyErr_NoMemory();
  }
  for (Py_ssize_t k = 0; k < count; ++k) {
    PyObject* item = PyList_GET_ITEM(entries, k);
    TapeEntry* entry = &tape->entries[k];
    tape->count = k + 1;  // freed with the tape from here on
    if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 3 &&
        PyTuple_Check(PyTuple_GET_ITEM(item, 1)) && PyTuple_Check(PyTuple_GET_ITEM(item, 2))) {
      entry->fn = (packed_fn)(uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
      if (PyErr_Occurred() ||
          int64s_of(PyTuple_GET_ITEM(item, 1), (int64_t**)&entry->pointers, 1) < 0 ||
          int64s_of(PyTuple_GET_ITEM(item, 2), &entry->scalars, 0) < 0) {
        Py_DECREF(tape);
        return nullptr;
      }
    } else if (PyCallable_Check(item)) {
      Py_INCREF(item);
      entry->call = item;
    } else {
      PyErr_SetString(PyExc_TypeError,
                      "memopt tape: an entry is (address, pointers, scalars) or a callable");
      Py_DECREF(tape);
      return nullptr;
    }
  }
  Py_ssize_t patch_count = patches == nullptr ? 0 : PyTuple_GET_SIZE(patches);
  tape->patches = (TapePatch*)PyMem_Calloc(patch_count + 1, sizeof(TapePatch));
  if (tape->patches == nullptr) {
    Py_DECREF(tape);
    return PyErr_NoMemory();
  }
  for (Py_ssize_t k = 0; k < patch_count; ++k) {
    TapePatch* patch = &tape->patches[k];
    PyObject* item = PyTuple_GET_ITEM(patches, k);
    long long offset = 0;
    if (!PyTuple_Check(item) ||
        !PyArg_ParseTuple(item, "nnnL", &patch->entry, &patch->pointer, &patch->buffer,
                          &offset)) {
      if (!PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "memopt tape: a patch is (entry, pointer, buffer, offset)");
      Py_DECREF(tape);
      return nullptr;
    }
    patch->offset = offset;
    bool launch = patch->entry >= 0 && patch->entry < count &&
                  tape->entries[patch->entry].call == nullptr;
    Py_ssize_t pointers =
        launch ? PyTuple_GET_SIZE(PyTuple_GET_ITEM(PyList_GET_ITEM(entries, patch->entry), 1)) : 0;
    if (!launch || patch->pointer < 0 || patch->pointer >= pointers || patch->buffer < 0) {
      PyErr_SetString(PyExc_ValueError,
                      "memopt tape: a patch names no pointer of a launch, or a negative buffer");
      Py_DECREF(tape);
      return nullptr;
    }
    tape->patch_count = k + 1;
    if (patch->buffer + 1 > tape->buffers) tape->buffers = patch->buffer + 1;
  }
  return (PyObject*)tape;
}

// One thread records at a time: record(list) while another thread records raises
// RuntimeError; record(None) ends the calling thread's recording (nothing otherwise).
static PyObject* record(PyObject* module, PyObject* target) {
  if (target != Py_None && !PyList_Check(target)) {
    PyErr_SetString(PyExc_TypeError, "memopt launcher: record(list) or record(None)");
    return nullptr;
  }
  PyThreadState* thread = PyThreadState_Get();
  if (target == Py_None) {
    if (recording != nullptr && recording_thread == thread) Py_CLEAR(recording);
    Py_RETURN_NONE;
  }
  if (recording != nullptr && recording_thread != thread) {
    PyErr_SetString(PyExc_RuntimeError, "memopt launcher: another thread is recording");
    return nullptr;
  }
  Py_INCREF(target);
  Py_XSETREF(recording, target);
  recording_thread = thread;
  Py_RETURN_NONE;
}

// A tape's inputs used where they are (runtime/tape.py, `Tape.__call__`), checked in one
// call: `table` holds (position, tensor, address, (dtype, shape, strides), version or
// None). Returns -1 where the argument at each position is that very tensor, at that
// address, on the CPU with that dtype, shape and strides (`matches`, as a launch checks
// its tensors), no negation or conjugation bit and, where one is given, that version;
// else the first position where it is not (the caller then looks at the arguments in
// Python). With a false third argument the layouts (device, dtype, shape, strides and
// the two bits) are left to the caller, which checks them in one call of its own.
static int same_input(PyObject* tensor, PyObject* entry, int layouts) {
  void* address = pointer_of(tensor);
  if (address == nullptr && PyErr_Occurred()) return -1;
  void* recorded = PyLong_AsVoidPtr(PyTuple_GET_ITEM(entry, 2));
  if (recorded == nullptr && PyErr_Occurred()) return -1;
  if (address != recorded) return 0;
  int same = layouts ? matches(tensor, PyTuple_GET_ITEM(entry, 3)) : 1;
  PyObject* value;
  PyObject* const bits[] = {is_neg_name, is_conj_name};
  for (PyObject* bit : bits) {
    if (same != 1 || !layouts) break;
    value = PyObject_CallMethodNoArgs(tensor, bit);
    if (value == nullptr) return -1;
    same = value == Py_False;
    Py_DECREF(value);
  }
  if (same == 1 && PyTuple_GET_ITEM(entry, 4) != Py_None) {
    value = PyObject_GetAttr(tensor, version_name);
    if (value == nullptr) return -1;
    same = PyObject_RichCompareBool(value, PyTuple_GET_ITEM(entry, 4), Py_EQ);
    Py_DECREF(value);
  }
  return same;
}

static PyObject* same_inputs(PyObject* module, PyObject* const* argv, Py_ssize_t argc) {
  if (argc < 2 || argc > 3 || !PyTuple_Check(argv[1])) {
    PyErr_SetString(PyExc_TypeError,
                    "memopt launcher: same_inputs(arguments, table[, layouts])");
    return nullptr;
  }
  const int layouts = argc == 3 ? PyObject_IsTrue(argv[2]) : 1;
  if (layouts < 0) return nullptr;
  // the arguments as they are now: attribute reads may run Python that changes a list
  PyObject* args = PySequence_Tuple(argv[0]);
  if (args == nullptr) return nullptr;
  PyObject* table = argv[1];
  PyObject* result = nullptr;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(table) && result == nullptr; ++k) {
    PyObject* entry = PyTuple_GET_ITEM(table, k);
    PyObject* check = PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 5
                          ? PyTuple_GET_ITEM(entry, 3)
                          : nullptr;
    if (check == nullptr || !PyTuple_Check(check) || PyTuple_GET_SIZE(check) != 3) {
      PyErr_SetString(PyExc_TypeError,
                      "memopt launcher: a table row is (position, tensor, address, "
                      "(dtype, shape, strides), version)");
      break;
    }
    PyObject* position_object = PyTuple_GET_ITEM(entry, 0);
    const Py_ssize_t position = PyLong_AsSsize_t(position_object);
    if (position == -1 && PyErr_Occurred()) break;
    if (position < 0 || position >= PyTuple_GET_SIZE(args) ||
        PyTuple_GET_ITEM(args, position) != PyTuple_GET_ITEM(entry, 1)) {
      result = Py_NewRef(position_object);
      break;
    }
    const int same = same_input(PyTuple_GET_ITEM(args, position), entry, layouts);
    if (same < 0) break;
    if (!same) result = Py_NewRef(position_object);
  }
  if (result == nullptr && !PyErr_Occurred()) result = PyLong_FromLong(-1);
  Py_DECREF(args);
  return result;
}

static void launch_dealloc(PyObject* self) {
  PyMem_Free(((Launch*)self)->scalars);
  Py_XDECREF(((Launch*)self)->checks);
  Py_TYPE(self)->tp_free(self);
}

static PyTypeObject LaunchType = {PyVarObject_HEAD_INIT(nullptr, 0)};

static PyObject* bind(PyObject* module, PyObject* args) {
  unsigned long long address;
  Py_ssize_t tensors;
  PyObject* scalars;
  PyObject* checks;
  if (!PyArg_ParseTuple(args, "KnO!O!", &address, &tensors, &PyTuple_Type, &scalars,
                        &PyTuple_Type, &checks))
    return nullptr;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(checks); ++k) {
    PyObject* check = PyTuple_GET_ITEM(checks, k);
    if (!PyTuple_Check(check) || PyTuple_GET_SIZE(check) != 3) {
      PyErr_SetString(PyExc_TypeError, "memopt launcher: a check is (dtype, shape, strides)");
      return nullptr;
    }
  }
  if (tensors < 0 || tensors > MAX_TENSORS) {
    PyErr_SetString(PyExc_ValueError, "memopt launcher: too many tensors");
    return nullptr;
  }
  Launch* launch = PyObject_New(Launch, &LaunchType);
  if (launch == nullptr) return nullptr;
  launch->vectorcall = launch_call;
  launch->scalars = nullptr;
  Py_INCREF(checks);
  launch->checks = checks;
  launch->fn = (packed_fn)(uintptr_t)address;
  launch->tensors = tensors;
  launch->scalar_count = PyTuple_GET_SIZE(scalars);
  launch->scalars = (int64_t*)PyMem_Malloc(sizeof(int64_t) * (launch->scalar_count + 1));
  if (launch->scalars == nullptr) {
    Py_DECREF(launch);
    return PyErr_NoMemory();
  }
  for (Py_ssize_t k = 0; k < launch->scalar_count; ++k) {
    launch->scalars[k] = PyLong_AsLongLong(PyTuple_GET_ITEM(scalars, k));
    if (launch->scalars[k] == -1 && PyErr_Occurred()) {
      Py_DECREF(launch);
      return nullptr;
    }
  }
  return (PyObject*)launch;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "bind(address, tensors, scalars, checks) -> launch"},
    {"tape", make_tape, METH_VARARGS,
     "tape(entries[, patches]) -> a callable running them in order"},
    {"record", record, METH_O, "record(list | None): launches append what they ran"},
    {"same_inputs", (PyCFunction)(void (*)(void))same_inputs, METH_FASTCALL,
     "same_inputs(args, table[, layouts]) -> -1, or the first position whose tensor is not "
     "as recorded"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "launcher", nullptr, -1,
                                        methods};

// A callable type whose objects are called through their `vectorcall` slot.
static int ready(PyTypeObject* type, const char* name, Py_ssize_t size, Py_ssize_t vectorcall,
                 destructor dealloc) {
  type->tp_name = name;
  type->tp_basicsize = size;
  type->tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  type->tp_vectorcall_offset = vectorcall;
  type->tp_call = PyVectorcall_Call;
  type->tp_dealloc = dealloc;
  return PyType_Ready(type);
}

PyMODINIT_FUNC PyInit_launcher(void) {
  const char* address = getenv("MEMOPT_TENSOR_DATA_PTR");
  if (address == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "MEMOPT_TENSOR_DATA_PTR is not set");
    return nullptr;
  }
  tensor_data_ptr = (data_ptr_fn)(uintptr_t)strtoull(address, nullptr, 10);
  dtype_name = PyUnicode_InternFromString("dtype");
  is_cpu_name = PyUnicode_InternFromString("is_cpu");
  shape_name = PyUnicode_InternFromString("shape");
  stride_name = PyUnicode_InternFromString("stride");
  version_name = PyUnicode_InternFromString("_version");
  is_neg_name = PyUnicode_InternFromString("is_neg");
  is_conj_name = PyUnicode_InternFromString("is_conj");
  if (!dtype_name || !is_cpu_name || !shape_name || !stride_name || !version_name ||
      !is_neg_name || !is_conj_name)
    return nullptr;
  if (ready(&LaunchType, "memopt_launcher.Launch", sizeof(Launch), offsetof(Launch, vectorcall),
            launch_dealloc) < 0 ||
      ready(&TapeType, "memopt_launcher.Tape", sizeof(Tape), offsetof(Tape, vectorcall),
            tape_dealloc) < 0)
    return nullptr;
  return PyModule_Create(&module_def);
}
""".replace("@MAX_TENSORS@", str(MAX_TENSORS))


# The launcher's build started ahead of its first use (`prefetch`), if one was.
_prefetched: list[concurrent.futures.Future[Path]] = []
_prefetch_lock = threading.Lock()


def prefetch() -> None:
    """Start building the launcher in the background, beside a graph's kernels (the C++
    backend's `prefetch_kernel`), so that a cold cache's first call does not wait for it."""
    with _prefetch_lock:
        if _prefetched or module.cache_info().currsize:
            return  # under way, or loaded
        found = _requirements()
        if found is not None:
            _prefetched.append(build.in_background(_built, found[0]))


@functools.cache
def _requirements() -> tuple[str, int] | None:
    """(Python's include directory, the address of torch's data-pointer function), where
    the extension can be built and work; None elsewhere."""
    address = getattr(torch._C._dynamo.guards, "_torchinductor_pyobject_tensor_data_ptr", None)
    include = sysconfig.get_paths().get("include")
    if not address or not include or not Path(include, "Python.h").exists():
        return None
    return include, int(address)


@functools.cache
def module() -> ModuleType | None:
    """The loaded launcher extension (built on the first call, or by `prefetch`), or None
    where it cannot be built or loaded."""
    found = _requirements()
    if found is None:
        return None
    include, address = found
    try:
        with _prefetch_lock:
            pending = _prefetched[0] if _prefetched else None
        # A failed prefetch is built again here, where its error is handled.
        path = _built(include) if pending is None or pending.exception() else pending.result()
        os.environ["MEMOPT_TENSOR_DATA_PTR"] = str(address)
        loader = importlib.machinery.ExtensionFileLoader("memopt_launcher.launcher", str(path))
        spec = importlib.util.spec_from_loader(loader.name, loader)
        loaded = importlib.util.module_from_spec(spec)
        loader.exec_module(loaded)
        return loaded
    except (OSError, ImportError, build.CompileError, build.CompilerNotFound, RuntimeError):
        return None


def bind_layouts(
    address: int, operands: tuple[torch.Tensor, ...], unchecked: int, scalars: tuple[int, ...]
) -> object | None:
    """A launch of the packed entry at `address` taking `operands`, laid out as they are now
    (each call checks their dtype, shape and strides in C and returns LAYOUT_MISMATCH
    without running where one differs), then `unchecked` more tensors (outputs, a stored
    weight), with `scalars` bound; None where the launcher is not built. For the library
    kernels that bind the layouts of their last planned call (GEMVs, decode attention)."""
    native = module()
    if native is None:
        return None
    checks = tuple((t.dtype, tuple(t.shape), tuple(t.stride())) for t in operands)
    return native.bind(address, len(operands) + unchecked, scalars, checks)


def _built(include: str) -> Path:
    """The extension's library in the cache, compiled unless it is there. Built as the
    kernels are (`build._compile_to`: a temporary file in the cache directory), without
    the kernels' optional flags (`--no-undefined` would reject Python's symbols), and
    renamed into place atomically."""
    compiler = build.compiler()
    identity = "\0".join([SOURCE, compiler, sys.version, include, sysconfig.get_platform()])
    directory = build.cache_dir()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = directory / f"launcher-{build._digest(identity)[:32]}{suffix}"
    if not path.exists():
        flags = ("-O2", "-std=c++17", f"-I{include}")
        os.replace(build._compile_to(compiler, flags, SOURCE, directory), path)
    return path
