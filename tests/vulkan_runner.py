"""Run one kernel of fmc's Vulkan module on a Vulkan device (Mesa's lavapipe on machines
without a GPU), with the calling convention of TVM's Vulkan runtime: storage buffers at
set 0 in argument order, scalars in 8-byte push-constant slots, `vkCmdDispatch` over the
blockIdx extents. The tests use it to check generated kernels against numpy on their own,
outside a model (whole models run on fmc's Vulkan runtime plugin, fmc/devices/).

Needs the `vulkan` Python package (cffi bindings) and a Vulkan driver."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmc.errors import MissingToolchainError

LAVAPIPE_ICD = Path("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")
SCALAR_FORMATS = {"int64": "<q", "uint64": "<Q", "int32": "<i4x", "uint32": "<I4x",
                  "float32": "<f4x", "float64": "<d"}


def _import_vulkan():
    if "VK_ICD_FILENAMES" not in os.environ and LAVAPIPE_ICD.exists():
        os.environ["VK_ICD_FILENAMES"] = str(LAVAPIPE_ICD)  # before the loader starts
    try:
        import vulkan
    except (ImportError, OSError) as exc:
        raise MissingToolchainError(f"running Vulkan kernels needs the `vulkan` package and "
                                    f"libvulkan ({exc}); pip install vulkan==1.3.275.1, "
                                    "apt-get install libvulkan1 mesa-vulkan-drivers") from None
    return vulkan


@contextmanager
def recording_launches() -> Iterator[None]:
    """While active, every Shader fmc's Vulkan route emits also carries what launching its
    kernel alone takes, which a model never needs (the host code computes it): `grid_exprs`,
    the blockIdx extents as TIR expressions, and `buffer_shapes`, each buffer parameter's
    declared flat shape (a scalar parameter may be one of its variables)."""
    from fmc.targets import vulkan_glsl

    emit_shader, emitter = vulkan_glsl.emit_shader, vulkan_glsl.GLSLEmitter

    @dataclass
    class Recorder(emitter):
        params: dict = field(default_factory=dict)  # data Var handle → parameter name
        block_exprs: dict = field(default_factory=dict)
        buffer_shapes: dict = field(default_factory=dict)

        def _s_AttrStmt(self, node, indent):
            if node.attr_key == "thread_extent":
                family, _, axis = node.node.thread_tag.partition(".")
                if family == "blockIdx":
                    self.block_exprs[axis] = node.value
            return super()._s_AttrStmt(node, indent)

        def _s_DeclBuffer(self, node, indent):
            name = self.params.get(vulkan_glsl.key(node.data))
            if name is not None:
                self.buffer_shapes[name] = list(node.buffer.shape)
            return super()._s_DeclBuffer(node, indent)

    def emit_recording(name, func):
        made = []

        def make(kernel):
            made.append(Recorder(kernel, params={vulkan_glsl.key(p): p.name
                                                 for p in func.params}))
            return made[-1]

        vulkan_glsl.GLSLEmitter = make
        try:
            shader = emit_shader(name, func)
        finally:
            vulkan_glsl.GLSLEmitter = emitter
        shader.grid_exprs = tuple(made[0].block_exprs.get(axis, 1) for axis in "xyz")
        shader.buffer_shapes = made[0].buffer_shapes
        return shader

    vulkan_glsl.emit_shader = emit_recording
    try:
        yield
    finally:
        vulkan_glsl.emit_shader = emit_shader


class VulkanDevice:
    """One logical device with a compute queue and the 8/16-bit, fp16 and int64 features the
    generated shaders use."""

    def __init__(self):
        vk = self.vk = _import_vulkan()
        app = vk.VkApplicationInfo(sType=vk.VK_STRUCTURE_TYPE_APPLICATION_INFO,
                                   pApplicationName="fmc", applicationVersion=1,
                                   pEngineName="fmc", engineVersion=1,
                                   apiVersion=vk.VK_MAKE_VERSION(1, 2, 0))
        try:
            self.instance = vk.vkCreateInstance(vk.VkInstanceCreateInfo(
                sType=vk.VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, pApplicationInfo=app), None)
            physical = vk.vkEnumeratePhysicalDevices(self.instance)[0]
        except (vk.VkError, IndexError) as exc:
            raise MissingToolchainError(f"no Vulkan device ({type(exc).__name__}); install "
                                        "mesa-vulkan-drivers for lavapipe") from None
        self.physical = physical
        self.name = vk.vkGetPhysicalDeviceProperties(physical).deviceName
        families = vk.vkGetPhysicalDeviceQueueFamilyProperties(physical)
        self.family = next(i for i, f in enumerate(families)
                           if f.queueFlags & vk.VK_QUEUE_COMPUTE_BIT)
        v12 = vk.VkPhysicalDeviceVulkan12Features(
            sType=vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES,
            shaderFloat16=vk.VK_TRUE, shaderInt8=vk.VK_TRUE,
            storageBuffer8BitAccess=vk.VK_TRUE)
        v11 = vk.VkPhysicalDeviceVulkan11Features(
            sType=vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES, pNext=v12,
            storageBuffer16BitAccess=vk.VK_TRUE)
        features = vk.VkPhysicalDeviceFeatures2(
            sType=vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, pNext=v11,
            features=vk.VkPhysicalDeviceFeatures(shaderInt64=vk.VK_TRUE, shaderInt16=vk.VK_TRUE))
        queue_info = vk.VkDeviceQueueCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, queueFamilyIndex=self.family,
            queueCount=1, pQueuePriorities=[1.0])
        self.device = vk.vkCreateDevice(physical, vk.VkDeviceCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, pNext=features,
            queueCreateInfoCount=1, pQueueCreateInfos=[queue_info]), None)
        self.queue = vk.vkGetDeviceQueue(self.device, self.family, 0)
        memory = vk.vkGetPhysicalDeviceMemoryProperties(physical)
        wanted = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        self.memory_type = next(i for i in range(memory.memoryTypeCount)
                                if memory.memoryTypes[i].propertyFlags & wanted == wanted)

    def close(self) -> None:
        vk = self.vk
        vk.vkDestroyDevice(self.device, None)
        vk.vkDestroyInstance(self.instance, None)

    def _buffer(self, array: np.ndarray):
        vk = self.vk
        size = max(4, (array.nbytes + 3) // 4 * 4)
        buffer = vk.vkCreateBuffer(self.device, vk.VkBufferCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, size=size,
            usage=vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT,
            sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE), None)
        needed = vk.vkGetBufferMemoryRequirements(self.device, buffer)
        memory = vk.vkAllocateMemory(self.device, vk.VkMemoryAllocateInfo(
            sType=vk.VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, allocationSize=needed.size,
            memoryTypeIndex=self.memory_type), None)
        vk.vkBindBufferMemory(self.device, buffer, memory, 0)
        mapped = vk.vkMapMemory(self.device, memory, 0, size, 0)
        mapped[:array.nbytes] = np.ascontiguousarray(array).tobytes()
        vk.vkUnmapMemory(self.device, memory)
        return buffer, memory, size

    def run(self, spirv: bytes, buffers: list[np.ndarray], scalars: list[tuple[str, object]],
            grid: tuple[int, int, int]) -> list[np.ndarray]:
        """Dispatch the kernel; returns every buffer's contents afterwards (same dtypes and
        shapes as given)."""
        vk, device = self.vk, self.device
        resources = [self._buffer(a) for a in buffers]
        bindings = [vk.VkDescriptorSetLayoutBinding(
            binding=i, descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, descriptorCount=1,
            stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT) for i in range(len(buffers))]
        set_layout = vk.vkCreateDescriptorSetLayout(device, vk.VkDescriptorSetLayoutCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
            bindingCount=len(bindings), pBindings=bindings), None)
        push = b"".join(struct.pack(SCALAR_FORMATS[dtype], value) for dtype, value in scalars)
        ranges = [vk.VkPushConstantRange(stageFlags=vk.VK_SHADER_STAGE_COMPUTE_BIT, offset=0,
                                         size=len(push))] if push else []
        layout = vk.vkCreatePipelineLayout(device, vk.VkPipelineLayoutCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, setLayoutCount=1,
            pSetLayouts=[set_layout], pushConstantRangeCount=len(ranges),
            pPushConstantRanges=ranges or None), None)
        shader = vk.vkCreateShaderModule(device, vk.VkShaderModuleCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, codeSize=len(spirv),
            pCode=spirv), None)
        # Held in its own variable: built inline, its entry-point string is freed too early.
        stage = vk.VkPipelineShaderStageCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
            stage=vk.VK_SHADER_STAGE_COMPUTE_BIT, module=shader, pName="main")
        pipeline = vk.vkCreateComputePipelines(device, None, 1, [vk.VkComputePipelineCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO, stage=stage, layout=layout,
            basePipelineIndex=-1)], None)[0]
        pool = vk.vkCreateDescriptorPool(device, vk.VkDescriptorPoolCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO, maxSets=1,
            poolSizeCount=1, pPoolSizes=[vk.VkDescriptorPoolSize(
                type=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, descriptorCount=max(1, len(buffers)))]),
            None)
        descriptor_set = vk.vkAllocateDescriptorSets(device, vk.VkDescriptorSetAllocateInfo(
            sType=vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, descriptorPool=pool,
            descriptorSetCount=1, pSetLayouts=[set_layout]))[0]
        writes = [vk.VkWriteDescriptorSet(
            sType=vk.VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, dstSet=descriptor_set,
            dstBinding=i, descriptorCount=1, descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
            pBufferInfo=[vk.VkDescriptorBufferInfo(buffer=buffer, offset=0, range=size)])
            for i, (buffer, _, size) in enumerate(resources)]
        vk.vkUpdateDescriptorSets(device, len(writes), writes, 0, None)
        command_pool = vk.vkCreateCommandPool(device, vk.VkCommandPoolCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
            queueFamilyIndex=self.family), None)
        command = vk.vkAllocateCommandBuffers(device, vk.VkCommandBufferAllocateInfo(
            sType=vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, commandPool=command_pool,
            level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1))[0]
        vk.vkBeginCommandBuffer(command, vk.VkCommandBufferBeginInfo(
            sType=vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO))
        vk.vkCmdBindPipeline(command, vk.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline)
        vk.vkCmdBindDescriptorSets(command, vk.VK_PIPELINE_BIND_POINT_COMPUTE, layout, 0, 1,
                                   [descriptor_set], 0, None)
        if push:
            vk.vkCmdPushConstants(command, layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(push),
                                  vk.ffi.from_buffer(push))
        vk.vkCmdDispatch(command, *grid)
        vk.vkEndCommandBuffer(command)
        fence = vk.vkCreateFence(device, vk.VkFenceCreateInfo(
            sType=vk.VK_STRUCTURE_TYPE_FENCE_CREATE_INFO), None)
        vk.vkQueueSubmit(self.queue, 1, [vk.VkSubmitInfo(
            sType=vk.VK_STRUCTURE_TYPE_SUBMIT_INFO, commandBufferCount=1,
            pCommandBuffers=[command])], fence)
        vk.vkWaitForFences(device, 1, [fence], vk.VK_TRUE, 60 * 10**9)
        results = []
        for array, (_, memory, size) in zip(buffers, resources, strict=True):
            mapped = vk.vkMapMemory(device, memory, 0, size, 0)
            data = bytes(mapped[:array.nbytes])
            vk.vkUnmapMemory(device, memory)
            results.append(np.frombuffer(data, dtype=array.dtype).reshape(array.shape).copy())
        vk.vkDestroyFence(device, fence, None)
        vk.vkDestroyCommandPool(device, command_pool, None)
        vk.vkDestroyDescriptorPool(device, pool, None)
        vk.vkDestroyPipeline(device, pipeline, None)
        vk.vkDestroyShaderModule(device, shader, None)
        vk.vkDestroyPipelineLayout(device, layout, None)
        vk.vkDestroyDescriptorSetLayout(device, set_layout, None)
        for buffer, memory, _ in resources:
            vk.vkDestroyBuffer(device, buffer, None)
            vk.vkFreeMemory(device, memory, None)
        return results


def evaluate(expr, env: dict[str, int]) -> int:
    """An integer TIR expression (launch extents, shapes) given its variables' values."""
    if isinstance(expr, int):
        return expr
    kind = type(expr).__name__
    if kind == "IntImm":
        return int(expr.value)
    if kind in ("Var", "SizeVar"):
        return env[expr.name]
    if kind == "Cast":
        return evaluate(expr.value, env)
    return _BINARY[kind](evaluate(expr.a, env), evaluate(expr.b, env))


_BINARY = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
           "FloorDiv": lambda a, b: a // b, "FloorMod": lambda a, b: a % b,
           "Div": lambda a, b: int(a / b), "Mod": lambda a, b: a - int(a / b) * b,  # truncating
           "Min": min, "Max": max, "RShift": lambda a, b: a >> b,
           "LShift": lambda a, b: a << b, "BitwiseAnd": lambda a, b: a & b}


def launch_arguments(shader, arrays: dict[str, np.ndarray], known: dict[str, int]):
    """(buffers in argument order, scalars, grid) to run `shader` (emitted while
    `recording_launches` was active) alone: scalar parameters
    come from `known` (the host's shape variables) or from a buffer whose declared flat
    shape is that one variable (what the host passes as e.g. `cse_v1`). Buffers are passed
    whole, so their element offsets (`*_elem_offset`) are 0 unless given."""
    env = {p.name: 0 for p in shader.params if p.name.endswith("_elem_offset")} | known
    for param in shader.params:
        shape = shader.buffer_shapes.get(param.name, [])
        if param.is_buffer and len(shape) == 1 and type(shape[0]).__name__ == "Var":
            env.setdefault(shape[0].name, int(arrays[param.name.removesuffix("_ptr")].size))
    buffers = [arrays[p.name.removesuffix("_ptr")] for p in shader.params if p.is_buffer]
    scalars = [(p.dtype, env[p.name]) for p in shader.params if not p.is_buffer]
    grid = tuple(evaluate(e, env) for e in shader.grid_exprs)
    return buffers, scalars, grid


def run_shader(device: VulkanDevice, shader, spirv: bytes, arrays: dict[str, np.ndarray],
               known: dict[str, int]) -> dict[str, np.ndarray]:
    """Run one kernel with `arrays` keyed by buffer name; returns the buffers afterwards,
    keyed the same way."""
    buffers, scalars, grid = launch_arguments(shader, arrays, known)
    names = [p.name.removesuffix("_ptr") for p in shader.params if p.is_buffer]
    return dict(zip(names, device.run(spirv, buffers, scalars, grid), strict=True))
