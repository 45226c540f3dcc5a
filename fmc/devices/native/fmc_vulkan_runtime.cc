// fmc's Vulkan runtime for the pinned TVM wheel, which ships none (no device_api.vulkan, no
// Vulkan module loader). Built by fmc/devices/vulkan_runtime.py with the system g++ against
// the wheel's headers, loaded with RTLD_GLOBAL after `import tvm`; its static initialiser
// registers:
//   device_api.vulkan                    a DeviceAPI: buffers, copies, sync, attributes
//   ffi.Module.load_from_bytes.vulkan    the loader of the "vulkan" module fmc embeds
//                                        (layout: fmc/targets/vulkan_module.py)
//   fmc.vulkan.info                      device name / API version / count, for fmc doctor
// Deliberately small: one device per device_id with one queue, a descriptor pool per batch,
// one command buffer that collects copies and dispatches until something needs the host
// (a device-to-host copy or a sync), a staging-buffer pool, and one fence.
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/cast.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/device_api.h>
#include <vulkan/vulkan.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace fmc_vulkan {

using tvm::ffi::Any;
using tvm::ffi::PackedArgs;
namespace ffi = tvm::ffi;
using tvm::runtime::DeviceAttrKind;

#define FMC_VK_CHECK(expr)                                                           \
  do {                                                                               \
    VkResult fmc_vk_result = (expr);                                                 \
    if (fmc_vk_result != VK_SUCCESS)                                                 \
      TVM_FFI_THROW(RuntimeError) << "Vulkan: " #expr " failed (VkResult "           \
                                  << static_cast<int>(fmc_vk_result) << ")";          \
  } while (0)

// Copies move through host-visible staging buffers of at most this size; larger copies go
// in pieces.
constexpr VkDeviceSize kStagingChunk = 8u << 20;
// Staging memory a batch may hold before it is flushed (bounds memory for big uploads).
constexpr VkDeviceSize kStagingInFlightLimit = 32u << 20;
constexpr uint32_t kSetsPerPool = 256;
constexpr uint32_t kDescriptorsPerPool = kSetsPerPool * 16;

struct Buffer {
  VkBuffer buffer = VK_NULL_HANDLE;
  VkDeviceMemory memory = VK_NULL_HANDLE;
  VkDeviceSize size = 0;
  void* mapped = nullptr;  // staging buffers only
};

class Instance {
 public:
  static Instance& Get() {
    static Instance* instance = new Instance();  // never destroyed: outlives every user
    return *instance;
  }
  bool ok() const { return instance_ != VK_NULL_HANDLE; }
  const std::string& error() const { return error_; }
  VkInstance handle() const { return instance_; }
  const std::vector<VkPhysicalDevice>& physical() const { return physical_; }

 private:
  Instance() {
    VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
    app.pApplicationName = "fmc";
    app.pEngineName = "fmc";
    app.apiVersion = VK_API_VERSION_1_2;
    VkInstanceCreateInfo info{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
    info.pApplicationInfo = &app;
    VkResult result = vkCreateInstance(&info, nullptr, &instance_);
    if (result != VK_SUCCESS) {
      instance_ = VK_NULL_HANDLE;
      error_ = "vkCreateInstance failed (VkResult " + std::to_string(result) +
               "): no Vulkan driver (ICD) found";
      return;
    }
    uint32_t count = 0;
    vkEnumeratePhysicalDevices(instance_, &count, nullptr);
    std::vector<VkPhysicalDevice> all(count);
    vkEnumeratePhysicalDevices(instance_, &count, all.data());
    for (VkPhysicalDevice device : all) {  // the shaders need Vulkan 1.2 (SPIR-V 1.5)
      VkPhysicalDeviceProperties props;
      vkGetPhysicalDeviceProperties(device, &props);
      if (props.apiVersion >= VK_API_VERSION_1_2) physical_.push_back(device);
    }
    // Device 0 is the best one: discrete, integrated, virtual GPU, then CPU (lavapipe).
    auto rank = [](VkPhysicalDevice device) {
      VkPhysicalDeviceProperties props;
      vkGetPhysicalDeviceProperties(device, &props);
      switch (props.deviceType) {
        case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 0;
        case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 1;
        case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
        case VK_PHYSICAL_DEVICE_TYPE_CPU: return 4;
        default: return 3;
      }
    };
    std::stable_sort(physical_.begin(), physical_.end(),
                     [&](VkPhysicalDevice a, VkPhysicalDevice b) { return rank(a) < rank(b); });
    if (physical_.empty()) error_ = "no Vulkan 1.2 device found";
  }
  VkInstance instance_ = VK_NULL_HANDLE;
  std::vector<VkPhysicalDevice> physical_;
  std::string error_;
};

// One logical device: its queue, memory types, the open batch and the staging pool.
class Device {
 public:
  explicit Device(VkPhysicalDevice physical) : physical_(physical) {
    vkGetPhysicalDeviceProperties(physical_, &props_);
    vkGetPhysicalDeviceMemoryProperties(physical_, &memory_props_);
    uint32_t count = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(physical_, &count, nullptr);
    std::vector<VkQueueFamilyProperties> families(count);
    vkGetPhysicalDeviceQueueFamilyProperties(physical_, &count, families.data());
    family_ = UINT32_MAX;
    for (uint32_t i = 0; i < count; ++i) {
      if (families[i].queueFlags & VK_QUEUE_COMPUTE_BIT) {
        family_ = i;
        break;
      }
    }
    if (family_ == UINT32_MAX)
      TVM_FFI_THROW(RuntimeError) << "Vulkan: " << props_.deviceName << " has no compute queue";

    // Enable what the generated shaders may use, as far as the device has it; a shader
    // needing a missing feature then fails at pipeline creation with the driver's message.
    VkPhysicalDeviceVulkan12Features has12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
    VkPhysicalDeviceVulkan11Features has11{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
    has11.pNext = &has12;
    VkPhysicalDeviceFeatures2 has{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
    has.pNext = &has11;
    vkGetPhysicalDeviceFeatures2(physical_, &has);
    VkPhysicalDeviceVulkan12Features want12{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
    want12.shaderFloat16 = has12.shaderFloat16;
    want12.shaderInt8 = has12.shaderInt8;
    want12.storageBuffer8BitAccess = has12.storageBuffer8BitAccess;
    want12.uniformAndStorageBuffer8BitAccess = has12.uniformAndStorageBuffer8BitAccess;
    VkPhysicalDeviceVulkan11Features want11{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
    want11.pNext = &want12;
    want11.storageBuffer16BitAccess = has11.storageBuffer16BitAccess;
    want11.uniformAndStorageBuffer16BitAccess = has11.uniformAndStorageBuffer16BitAccess;
    VkPhysicalDeviceFeatures2 want{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
    want.pNext = &want11;
    want.features.shaderInt64 = has.features.shaderInt64;
    want.features.shaderInt16 = has.features.shaderInt16;
    want.features.shaderFloat64 = has.features.shaderFloat64;
    float priority = 1.0f;
    VkDeviceQueueCreateInfo queue_info{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
    queue_info.queueFamilyIndex = family_;
    queue_info.queueCount = 1;
    queue_info.pQueuePriorities = &priority;
    VkDeviceCreateInfo info{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
    info.pNext = &want;
    info.queueCreateInfoCount = 1;
    info.pQueueCreateInfos = &queue_info;
    FMC_VK_CHECK(vkCreateDevice(physical_, &info, nullptr, &device_));
    vkGetDeviceQueue(device_, family_, 0, &queue_);

    VkCommandPoolCreateInfo pool_info{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
    pool_info.queueFamilyIndex = family_;
    FMC_VK_CHECK(vkCreateCommandPool(device_, &pool_info, nullptr, &command_pool_));
    VkCommandBufferAllocateInfo alloc{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
    alloc.commandPool = command_pool_;
    alloc.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
    alloc.commandBufferCount = 1;
    FMC_VK_CHECK(vkAllocateCommandBuffers(device_, &alloc, &command_));
    VkFenceCreateInfo fence_info{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    FMC_VK_CHECK(vkCreateFence(device_, &fence_info, nullptr, &fence_));
  }

  VkDevice handle() const { return device_; }
  const VkPhysicalDeviceProperties& props() const { return props_; }
  const VkPhysicalDeviceMemoryProperties& memory_props() const { return memory_props_; }
  std::mutex& mutex() { return mutex_; }

  // --- buffers -----------------------------------------------------------------------------
  Buffer* Allocate(VkDeviceSize nbytes) {
    Buffer* buffer = CreateBuffer(std::max<VkDeviceSize>(nbytes, 4), false);
    std::lock_guard<std::mutex> lock(mutex_);
    live_.insert(buffer);
    return buffer;
  }

  void Free(Buffer* buffer) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!live_.erase(buffer)) TVM_FFI_THROW(RuntimeError) << "Vulkan: freeing an unknown buffer";
    // The open batch may still use it: destroyed when the batch has finished.
    if (recording_) {
      retired_.push_back(buffer);
    } else {
      Destroy(buffer);
    }
  }

  Buffer* CheckBuffer(void* handle, const char* what) {
    Buffer* buffer = static_cast<Buffer*>(handle);
    if (handle == nullptr || !live_.count(buffer))
      TVM_FFI_THROW(ValueError) << what << " is not a live Vulkan buffer of this device";
    return buffer;
  }

  // --- batch -------------------------------------------------------------------------------
  // The command buffer is begun on first use and submitted by Flush(); every recorded
  // command is followed by a full compute/transfer barrier, so commands see each other's
  // writes in order (simple and correct; no dependency tracking).
  VkCommandBuffer Record() {
    if (!recording_) {
      VkCommandBufferBeginInfo begin{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
      begin.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
      FMC_VK_CHECK(vkBeginCommandBuffer(command_, &begin));
      recording_ = true;
    }
    return command_;
  }

  void Barrier() {
    VkMemoryBarrier barrier{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
    barrier.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
    barrier.dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT |
                            VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT |
                            VK_ACCESS_HOST_READ_BIT;
    VkPipelineStageFlags stages =
        VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT;
    vkCmdPipelineBarrier(command_, stages, stages | VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &barrier,
                         0, nullptr, 0, nullptr);
  }

  // Submit the batch and wait on the fence; then recycle its staging buffers, descriptor
  // sets and retired buffers.
  void Flush() {
    if (!recording_) return;
    recording_ = false;
    FMC_VK_CHECK(vkEndCommandBuffer(command_));
    VkSubmitInfo submit{VK_STRUCTURE_TYPE_SUBMIT_INFO};
    submit.commandBufferCount = 1;
    submit.pCommandBuffers = &command_;
    FMC_VK_CHECK(vkQueueSubmit(queue_, 1, &submit, fence_));
    FMC_VK_CHECK(vkWaitForFences(device_, 1, &fence_, VK_TRUE, UINT64_MAX));
    FMC_VK_CHECK(vkResetFences(device_, 1, &fence_));
    FMC_VK_CHECK(vkResetCommandPool(device_, command_pool_, 0));
    for (VkDescriptorPool pool : used_pools_) {
      vkResetDescriptorPool(device_, pool, 0);
      free_pools_.push_back(pool);
    }
    used_pools_.clear();
    for (Buffer* staging : staging_busy_) staging_free_.push_back(staging);
    staging_busy_.clear();
    staging_in_flight_ = 0;
    for (Buffer* buffer : retired_) Destroy(buffer);
    retired_.clear();
  }

  // A descriptor set for `layout` from the batch's pools (a new pool when they are full).
  VkDescriptorSet AllocateSet(VkDescriptorSetLayout layout) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (used_pools_.empty() || attempt == 1) {
        VkDescriptorPool pool;
        if (!free_pools_.empty()) {
          pool = free_pools_.back();
          free_pools_.pop_back();
        } else {
          VkDescriptorPoolSize size{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, kDescriptorsPerPool};
          VkDescriptorPoolCreateInfo info{VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO};
          info.maxSets = kSetsPerPool;
          info.poolSizeCount = 1;
          info.pPoolSizes = &size;
          FMC_VK_CHECK(vkCreateDescriptorPool(device_, &info, nullptr, &pool));
        }
        used_pools_.push_back(pool);
      }
      VkDescriptorSetAllocateInfo info{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO};
      info.descriptorPool = used_pools_.back();
      info.descriptorSetCount = 1;
      info.pSetLayouts = &layout;
      VkDescriptorSet set;
      VkResult result = vkAllocateDescriptorSets(device_, &info, &set);
      if (result == VK_SUCCESS) return set;
      if (result != VK_ERROR_OUT_OF_POOL_MEMORY && result != VK_ERROR_FRAGMENTED_POOL)
        FMC_VK_CHECK(result);
    }
    TVM_FFI_THROW(RuntimeError) << "Vulkan: cannot allocate a descriptor set";
    TVM_FFI_UNREACHABLE();
  }

  // --- copies ------------------------------------------------------------------------------
  void HostToDevice(const char* from, Buffer* to, VkDeviceSize offset, VkDeviceSize nbytes) {
    CheckRange(to, offset, nbytes);
    for (VkDeviceSize done = 0; done < nbytes;) {
      VkDeviceSize piece = std::min(kStagingChunk, nbytes - done);
      if (staging_in_flight_ + piece > kStagingInFlightLimit) Flush();
      Buffer* staging = AcquireStaging(piece);
      std::memcpy(staging->mapped, from + done, piece);
      VkBufferCopy region{0, offset + done, piece};
      vkCmdCopyBuffer(Record(), staging->buffer, to->buffer, 1, &region);
      Barrier();
      done += piece;
    }
  }

  void DeviceToHost(Buffer* from, VkDeviceSize offset, char* to, VkDeviceSize nbytes) {
    CheckRange(from, offset, nbytes);
    for (VkDeviceSize done = 0; done < nbytes;) {
      VkDeviceSize piece = std::min(kStagingChunk, nbytes - done);
      Buffer* staging = AcquireStaging(piece);
      VkBufferCopy region{offset + done, 0, piece};
      vkCmdCopyBuffer(Record(), from->buffer, staging->buffer, 1, &region);
      Barrier();
      Flush();
      std::memcpy(to + done, staging->mapped, piece);
      done += piece;
    }
  }

  void DeviceToDevice(Buffer* from, VkDeviceSize from_offset, Buffer* to,
                      VkDeviceSize to_offset, VkDeviceSize nbytes) {
    CheckRange(from, from_offset, nbytes);
    CheckRange(to, to_offset, nbytes);
    if (nbytes == 0) return;
    VkBufferCopy region{from_offset, to_offset, nbytes};
    vkCmdCopyBuffer(Record(), from->buffer, to->buffer, 1, &region);
    Barrier();
  }

 private:
  uint32_t FindMemory(VkMemoryPropertyFlags required, uint32_t type_bits) {
    for (uint32_t i = 0; i < memory_props_.memoryTypeCount; ++i) {
      if (type_bits && !(type_bits & (1u << i))) continue;
      if ((memory_props_.memoryTypes[i].propertyFlags & required) == required) return i;
    }
    return UINT32_MAX;
  }

  // Device-local memory for tensors (any type if the device has none that fits), mapped
  // host-visible coherent memory for staging.
  Buffer* CreateBuffer(VkDeviceSize nbytes, bool host_visible) {
    auto buffer = std::make_unique<Buffer>();
    buffer->size = nbytes;
    VkBufferCreateInfo info{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
    info.size = nbytes;
    info.usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                 VK_BUFFER_USAGE_TRANSFER_DST_BIT;
    info.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
    FMC_VK_CHECK(vkCreateBuffer(device_, &info, nullptr, &buffer->buffer));
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(device_, buffer->buffer, &req);
    VkMemoryPropertyFlags required =
        host_visible ? VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
                     : VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT;
    uint32_t type = FindMemory(required, req.memoryTypeBits);
    if (type == UINT32_MAX && !host_visible) type = FindMemory(0, req.memoryTypeBits);
    if (type == UINT32_MAX) {
      vkDestroyBuffer(device_, buffer->buffer, nullptr);
      TVM_FFI_THROW(RuntimeError) << "Vulkan: no memory type for a buffer";
    }
    VkMemoryAllocateInfo alloc{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
    alloc.allocationSize = req.size;
    alloc.memoryTypeIndex = type;
    VkResult result = vkAllocateMemory(device_, &alloc, nullptr, &buffer->memory);
    if (result != VK_SUCCESS) {
      vkDestroyBuffer(device_, buffer->buffer, nullptr);
      TVM_FFI_THROW(RuntimeError) << "Vulkan: out of device memory allocating " << nbytes
                                  << " bytes (VkResult " << result << ")";
    }
    FMC_VK_CHECK(vkBindBufferMemory(device_, buffer->buffer, buffer->memory, 0));
    if (host_visible)
      FMC_VK_CHECK(vkMapMemory(device_, buffer->memory, 0, VK_WHOLE_SIZE, 0, &buffer->mapped));
    return buffer.release();
  }

  void Destroy(Buffer* buffer) {
    vkDestroyBuffer(device_, buffer->buffer, nullptr);
    vkFreeMemory(device_, buffer->memory, nullptr);  // implicitly unmaps
    delete buffer;
  }

  Buffer* AcquireStaging(VkDeviceSize nbytes) {
    // Smallest free staging buffer that fits; else a new one of the next power of two.
    auto best = staging_free_.end();
    for (auto it = staging_free_.begin(); it != staging_free_.end(); ++it) {
      if ((*it)->size >= nbytes && (best == staging_free_.end() || (*it)->size < (*best)->size))
        best = it;
    }
    Buffer* staging;
    if (best != staging_free_.end()) {
      staging = *best;
      staging_free_.erase(best);
    } else {
      VkDeviceSize size = 64u << 10;
      while (size < nbytes) size <<= 1;
      staging = CreateBuffer(size, true);
    }
    staging_busy_.push_back(staging);
    staging_in_flight_ += staging->size;
    return staging;
  }

  static void CheckRange(Buffer* buffer, VkDeviceSize offset, VkDeviceSize nbytes) {
    if (offset + nbytes > buffer->size)
      TVM_FFI_THROW(IndexError) << "Vulkan: copy of " << nbytes << " bytes at offset " << offset
                                << " overruns a " << buffer->size << "-byte buffer";
  }

  VkPhysicalDevice physical_;
  VkPhysicalDeviceProperties props_;
  VkPhysicalDeviceMemoryProperties memory_props_;
  uint32_t family_;
  VkDevice device_ = VK_NULL_HANDLE;
  VkQueue queue_ = VK_NULL_HANDLE;
  VkCommandPool command_pool_ = VK_NULL_HANDLE;
  VkCommandBuffer command_ = VK_NULL_HANDLE;
  VkFence fence_ = VK_NULL_HANDLE;
  bool recording_ = false;
  std::vector<VkDescriptorPool> used_pools_, free_pools_;
  std::vector<Buffer*> staging_free_, staging_busy_, retired_;
  VkDeviceSize staging_in_flight_ = 0;
  std::unordered_set<Buffer*> live_;
  std::mutex mutex_;
};

// Devices by device_id, created on first use and kept for the process (TVM keeps its
// DeviceAPI singletons alive just the same).
Device& GetDevice(int device_id) {
  static std::mutex mutex;
  static std::unordered_map<int, Device*> devices;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = devices.find(device_id);
  if (it != devices.end()) return *it->second;
  Instance& instance = Instance::Get();
  if (!instance.ok() || instance.physical().empty())
    TVM_FFI_THROW(RuntimeError) << "Vulkan: " << instance.error();
  if (device_id < 0 || device_id >= static_cast<int>(instance.physical().size()))
    TVM_FFI_THROW(RuntimeError) << "Vulkan: no device " << device_id << " ("
                                << instance.physical().size() << " Vulkan 1.2 device(s))";
  Device* device = new Device(instance.physical()[device_id]);
  devices[device_id] = device;
  return *device;
}

class VulkanDeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  static VulkanDeviceAPI* Global() {
    static VulkanDeviceAPI* api = new VulkanDeviceAPI();
    return api;
  }

  void SetDevice(DLDevice) final {}

  void GetAttr(DLDevice dev, DeviceAttrKind kind, Any* rv) final {
    if (kind == tvm::runtime::kExist) {
      Instance& instance = Instance::Get();
      *rv = static_cast<int64_t>(instance.ok() && dev.device_id >= 0 &&
                                 dev.device_id < static_cast<int>(instance.physical().size()));
      return;
    }
    Device& device = GetDevice(dev.device_id);
    const VkPhysicalDeviceLimits& limits = device.props().limits;
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        *rv = static_cast<int64_t>(limits.maxComputeWorkGroupInvocations);
        break;
      case tvm::runtime::kWarpSize:
        *rv = static_cast<int64_t>(1);  // fmc's kernels use no subgroup operations
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        *rv = static_cast<int64_t>(limits.maxComputeSharedMemorySize);
        break;
      case tvm::runtime::kComputeVersion: {
        uint32_t v = device.props().apiVersion;
        *rv = ffi::String(std::to_string(VK_API_VERSION_MAJOR(v)) + "." +
                          std::to_string(VK_API_VERSION_MINOR(v)));
        break;
      }
      case tvm::runtime::kDeviceName:
        *rv = ffi::String(device.props().deviceName);
        break;
      case tvm::runtime::kMaxThreadDimensions: {
        std::ostringstream os;
        os << "[" << limits.maxComputeWorkGroupSize[0] << ", "
           << limits.maxComputeWorkGroupSize[1] << ", " << limits.maxComputeWorkGroupSize[2]
           << "]";
        *rv = ffi::String(os.str());
        break;
      }
      case tvm::runtime::kMaxRegistersPerBlock:
        *rv = static_cast<int64_t>(limits.maxComputeWorkGroupInvocations);
        break;
      case tvm::runtime::kApiVersion:
        *rv = static_cast<int64_t>(device.props().apiVersion);
        break;
      case tvm::runtime::kDriverVersion:
        *rv = static_cast<int64_t>(device.props().driverVersion);
        break;
      case tvm::runtime::kTotalGlobalMemory: {
        int64_t total = 0;
        const VkPhysicalDeviceMemoryProperties& memory = device.memory_props();
        for (uint32_t i = 0; i < memory.memoryHeapCount; ++i) {
          if (memory.memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)
            total += static_cast<int64_t>(memory.memoryHeaps[i].size);
        }
        *rv = total;
        break;
      }
      default:
        break;  // unknown to Vulkan (clock rate, SM count, GCN arch…): None
    }
  }

  void* AllocDataSpace(DLDevice dev, size_t nbytes, size_t, DLDataType) final {
    return GetDevice(dev.device_id).Allocate(nbytes);
  }

  void FreeDataSpace(DLDevice dev, void* ptr) final {
    GetDevice(dev.device_id).Free(static_cast<Buffer*>(ptr));
  }

  void StreamSync(DLDevice dev, TVMStreamHandle) final {
    Device& device = GetDevice(dev.device_id);
    std::lock_guard<std::mutex> lock(device.mutex());
    device.Flush();
  }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset,
                      size_t nbytes, DLDevice dev_from, DLDevice dev_to, DLDataType,
                      TVMStreamHandle) final {
    bool from_vk = dev_from.device_type == kDLVulkan, to_vk = dev_to.device_type == kDLVulkan;
    if (from_vk && to_vk) {
      if (dev_from.device_id != dev_to.device_id)
        TVM_FFI_THROW(RuntimeError) << "Vulkan: copies between two devices are not supported";
      Device& device = GetDevice(dev_from.device_id);
      std::lock_guard<std::mutex> lock(device.mutex());
      device.DeviceToDevice(device.CheckBuffer(const_cast<void*>(from), "copy source"),
                            from_offset, device.CheckBuffer(to, "copy destination"), to_offset,
                            nbytes);
    } else if (from_vk && dev_to.device_type == kDLCPU) {
      Device& device = GetDevice(dev_from.device_id);
      std::lock_guard<std::mutex> lock(device.mutex());
      device.DeviceToHost(device.CheckBuffer(const_cast<void*>(from), "copy source"),
                          from_offset, static_cast<char*>(to) + to_offset, nbytes);
    } else if (to_vk && dev_from.device_type == kDLCPU) {
      Device& device = GetDevice(dev_to.device_id);
      std::lock_guard<std::mutex> lock(device.mutex());
      device.HostToDevice(static_cast<const char*>(from) + from_offset,
                          device.CheckBuffer(to, "copy destination"), to_offset, nbytes);
    } else {
      TVM_FFI_THROW(RuntimeError) << "Vulkan: unsupported copy from device type "
                                  << dev_from.device_type << " to " << dev_to.device_type;
    }
  }
};

// ---- the module ---------------------------------------------------------------------------

// Reader of fmc's serialised module (little-endian; str/bytes = u64 length + bytes).
class Reader {
 public:
  Reader(const char* data, size_t size) : data_(data), size_(size) {}
  const char* Take(size_t n) {
    if (n > size_ - pos_) TVM_FFI_THROW(ValueError) << "Vulkan module: truncated";
    const char* at = data_ + pos_;
    pos_ += n;
    return at;
  }
  template <typename T>
  T Get() {
    T value;
    std::memcpy(&value, Take(sizeof(T)), sizeof(T));
    return value;
  }
  std::string Str() {
    uint64_t n = Get<uint64_t>();
    return std::string(Take(n), n);
  }
  bool done() const { return pos_ == size_; }

 private:
  const char* data_;
  size_t size_, pos_ = 0;
};

struct ArgType {
  uint8_t code, bits;
};

struct Kernel {
  std::string name;
  std::vector<ArgType> args;
  std::vector<std::string> launch_tags;
  std::vector<uint32_t> spirv;
  uint32_t flags = 0;
  size_t num_buffers = 0;
  std::vector<int> grid_axis;  // per launch tag: 0/1/2 for blockIdx.x/y/z, else -1
  VkShaderModule shader = VK_NULL_HANDLE;
  VkDescriptorSetLayout set_layout = VK_NULL_HANDLE;
  VkPipelineLayout layout = VK_NULL_HANDLE;
  VkPipeline pipeline = VK_NULL_HANDLE;
};

class VulkanModuleNode : public ffi::ModuleObj {
 public:
  VulkanModuleNode(ffi::Bytes raw, std::vector<Kernel> kernels)
      : raw_(std::move(raw)), kernels_(std::move(kernels)) {
    for (size_t i = 0; i < kernels_.size(); ++i) index_[kernels_[i].name] = i;
  }
  ~VulkanModuleNode() {
    if (!device_) return;
    VkDevice vk = device_->handle();
    {
      std::lock_guard<std::mutex> lock(device_->mutex());
      device_->Flush();
    }
    for (Kernel& k : kernels_) {
      vkDestroyPipeline(vk, k.pipeline, nullptr);
      vkDestroyPipelineLayout(vk, k.layout, nullptr);
      vkDestroyDescriptorSetLayout(vk, k.set_layout, nullptr);
      vkDestroyShaderModule(vk, k.shader, nullptr);
    }
  }

  const char* kind() const final { return "vulkan"; }
  int GetPropertyMask() const final {
    return ffi::Module::kBinarySerializable | ffi::Module::kRunnable;
  }
  ffi::Bytes SaveToBytes() const final { return raw_; }

  // Pipelines for device 0 (the only one fmc's artifacts run on), made on first use.
  void Prepare() {
    if (device_) return;
    Device& device = GetDevice(0);
    VkDevice vk = device.handle();
    for (Kernel& k : kernels_) {
      VkShaderModuleCreateInfo shader_info{VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO};
      shader_info.codeSize = k.spirv.size() * 4;
      shader_info.pCode = k.spirv.data();
      FMC_VK_CHECK(vkCreateShaderModule(vk, &shader_info, nullptr, &k.shader));
      std::vector<VkDescriptorSetLayoutBinding> bindings(k.num_buffers);
      for (size_t i = 0; i < k.num_buffers; ++i) {
        bindings[i] = {static_cast<uint32_t>(i), VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1,
                       VK_SHADER_STAGE_COMPUTE_BIT, nullptr};
      }
      VkDescriptorSetLayoutCreateInfo set_info{
          VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO};
      set_info.bindingCount = static_cast<uint32_t>(bindings.size());
      set_info.pBindings = bindings.data();
      FMC_VK_CHECK(vkCreateDescriptorSetLayout(vk, &set_info, nullptr, &k.set_layout));
      size_t scalars = k.args.size() - k.num_buffers;
      VkPushConstantRange range{VK_SHADER_STAGE_COMPUTE_BIT, 0,
                                static_cast<uint32_t>(8 * scalars)};
      VkPipelineLayoutCreateInfo layout_info{VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO};
      layout_info.setLayoutCount = 1;
      layout_info.pSetLayouts = &k.set_layout;
      layout_info.pushConstantRangeCount = scalars ? 1 : 0;
      layout_info.pPushConstantRanges = scalars ? &range : nullptr;
      FMC_VK_CHECK(vkCreatePipelineLayout(vk, &layout_info, nullptr, &k.layout));
      VkComputePipelineCreateInfo pipeline_info{VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
      pipeline_info.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
      pipeline_info.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
      pipeline_info.stage.module = k.shader;
      pipeline_info.stage.pName = "main";
      pipeline_info.layout = k.layout;
      pipeline_info.basePipelineIndex = -1;
      VkResult result =
          vkCreateComputePipelines(vk, VK_NULL_HANDLE, 1, &pipeline_info, nullptr, &k.pipeline);
      if (result != VK_SUCCESS)
        TVM_FFI_THROW(RuntimeError) << "Vulkan: kernel " << k.name
                                    << ": pipeline creation failed (VkResult " << result
                                    << "); the device may lack a feature it uses";
    }
    device_ = &device;
  }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    auto it = index_.find(std::string(name));
    if (it == index_.end()) return std::nullopt;
    // The function holds the module: the VM may keep it after the library handle is gone.
    ffi::ObjectPtr<ffi::Object> self = ffi::GetObjectPtr<ffi::Object>(this);
    size_t index = it->second;
    return ffi::Function::FromPacked(
        [self, this, index](PackedArgs args, Any*) { Launch(kernels_[index], args); });
  }

 private:
  // TVM's kernel calling convention: buffer handles, then scalars, then one value per launch
  // tag. Buffers bind to set 0 in order; each scalar fills an 8-byte push-constant slot.
  void Launch(const Kernel& k, PackedArgs args) {
    size_t expected = k.args.size() + k.launch_tags.size();
    if (static_cast<size_t>(args.size()) != expected)
      TVM_FFI_THROW(TypeError) << "Vulkan kernel " << k.name << ": expects " << expected
                               << " arguments (" << k.num_buffers << " buffers, "
                               << k.args.size() - k.num_buffers << " scalars, "
                               << k.launch_tags.size() << " launch values), got "
                               << args.size();
    Prepare();
    Device& device = *device_;
    std::lock_guard<std::mutex> lock(device.mutex());
    std::vector<VkDescriptorBufferInfo> infos(k.num_buffers);
    const VkDeviceSize max_range = device.props().limits.maxStorageBufferRange;
    for (size_t i = 0; i < k.num_buffers; ++i) {
      void* handle = nullptr;
      if (auto ptr = args[i].try_cast<void*>()) {
        handle = *ptr;
      } else if (auto tensor = args[i].try_cast<DLTensor*>()) {
        // Called by hand with tensors (tests): their buffer, which must start at offset 0.
        if ((*tensor)->device.device_type != kDLVulkan || (*tensor)->byte_offset != 0)
          TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name << ": argument " << i
                                    << " is not a Vulkan tensor at offset 0";
        handle = (*tensor)->data;
      } else {
        TVM_FFI_THROW(TypeError) << "Vulkan kernel " << k.name << ": argument " << i
                                 << " must be a buffer, got " << args[i].GetTypeKey();
      }
      std::string what = "kernel " + k.name + ": argument " + std::to_string(i);
      Buffer* buffer = device.CheckBuffer(handle, what.c_str());
      // A binding cannot cover more: the kernel would read past it (undefined), so refuse.
      if (buffer->size > max_range)
        TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name << ": argument " << i << " is a "
                                  << buffer->size << "-byte buffer; this device binds at most "
                                  << max_range << " bytes (maxStorageBufferRange)";
      infos[i] = {buffer->buffer, 0, buffer->size};
    }
    std::vector<uint64_t> push(k.args.size() - k.num_buffers, 0);
    for (size_t i = k.num_buffers; i < k.args.size(); ++i) {
      uint64_t& slot = push[i - k.num_buffers];
      const ArgType& t = k.args[i];
      if (t.code == kDLFloat) {
        double value = args[i].cast<double>();
        if (t.bits == 32) {
          float f = static_cast<float>(value);
          std::memcpy(&slot, &f, 4);
        } else {
          std::memcpy(&slot, &value, 8);
        }
      } else {
        int64_t value = args[i].cast<int64_t>();
        if (t.bits == 32) {
          uint32_t low = static_cast<uint32_t>(value);
          std::memcpy(&slot, &low, 4);
        } else {
          std::memcpy(&slot, &value, 8);
        }
      }
    }
    uint32_t grid[3] = {1, 1, 1};
    const uint32_t* max_grid = device.props().limits.maxComputeWorkGroupCount;
    for (size_t j = 0; j < k.launch_tags.size(); ++j) {
      int axis = k.grid_axis[j];
      if (axis < 0) continue;  // threadIdx extents are the shader's local size
      int64_t value = args[k.args.size() + j].cast<int64_t>();
      if (value < 0 || value > max_grid[axis])
        TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name << ": grid extent " << value
                                  << " on " << k.launch_tags[j] << " exceeds the device's "
                                  << max_grid[axis];
      grid[axis] = static_cast<uint32_t>(value);
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return;  // an empty launch
    VkCommandBuffer cmd = device.Record();
    VkDescriptorSet set = device.AllocateSet(k.set_layout);
    std::vector<VkWriteDescriptorSet> writes(k.num_buffers);
    for (size_t i = 0; i < k.num_buffers; ++i) {
      writes[i] = {VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET};
      writes[i].dstSet = set;
      writes[i].dstBinding = static_cast<uint32_t>(i);
      writes[i].descriptorCount = 1;
      writes[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
      writes[i].pBufferInfo = &infos[i];
    }
    vkUpdateDescriptorSets(device.handle(), static_cast<uint32_t>(writes.size()), writes.data(),
                           0, nullptr);
    vkCmdBindPipeline(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, k.pipeline);
    vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, k.layout, 0, 1, &set, 0,
                            nullptr);
    if (!push.empty())
      vkCmdPushConstants(cmd, k.layout, VK_SHADER_STAGE_COMPUTE_BIT, 0,
                         static_cast<uint32_t>(push.size() * 8), push.data());
    vkCmdDispatch(cmd, grid[0], grid[1], grid[2]);
    device.Barrier();
  }

  ffi::Bytes raw_;
  std::vector<Kernel> kernels_;
  std::unordered_map<std::string, size_t> index_;
  Device* device_ = nullptr;
};

ffi::Module LoadFromBytes(const ffi::Bytes& bytes) {
  Reader reader(bytes.data(), bytes.size());
  if (reader.Str() != "vulkan") TVM_FFI_THROW(ValueError) << "not a Vulkan module";
  std::unordered_map<std::string, Kernel> by_key;
  uint64_t count = reader.Get<uint64_t>();
  for (uint64_t i = 0; i < count; ++i) {
    std::string key = reader.Str();
    Kernel k;
    k.name = reader.Str();
    uint64_t nargs = reader.Get<uint64_t>();
    bool scalars_started = false;
    for (uint64_t a = 0; a < nargs; ++a) {
      ArgType t{reader.Get<uint8_t>(), reader.Get<uint8_t>()};
      reader.Get<uint16_t>();  // lanes
      if (t.code == kDLOpaqueHandle) {
        if (scalars_started)
          TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name << ": a buffer after a scalar";
        ++k.num_buffers;
      } else {
        scalars_started = true;
        if (t.bits != 32 && t.bits != 64)
          TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name << ": a " << int(t.bits)
                                    << "-bit scalar argument";
      }
      k.args.push_back(t);
    }
    if (k.args.size() - k.num_buffers > 16)
      TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name
                                << ": more than 16 scalars (128 bytes of push constants)";
    uint64_t ntags = reader.Get<uint64_t>();
    for (uint64_t t = 0; t < ntags; ++t) {
      std::string tag = reader.Str();
      int axis = -1;
      if (tag.rfind("blockIdx.", 0) == 0 && tag.size() == 10) axis = tag[9] - 'x';
      k.launch_tags.push_back(tag);
      k.grid_axis.push_back(axis);
    }
    uint64_t nextra = reader.Get<uint64_t>();
    for (uint64_t e = 0; e < nextra; ++e) {
      if (reader.Get<int32_t>() != 0)
        TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name << ": tensor-map arguments";
    }
    by_key[key] = std::move(k);
  }
  std::vector<Kernel> kernels;
  uint64_t nshaders = reader.Get<uint64_t>();
  for (uint64_t i = 0; i < nshaders; ++i) {
    std::string key = reader.Str();
    auto it = by_key.find(key);
    if (it == by_key.end()) TVM_FFI_THROW(ValueError) << "Vulkan module: no entry for " << key;
    Kernel k = std::move(it->second);
    by_key.erase(it);
    k.flags = reader.Get<uint32_t>();
    if (k.flags & 1)
      TVM_FFI_THROW(ValueError) << "Vulkan kernel " << k.name
                                << ": scalars in a uniform buffer are not supported";
    uint64_t words = reader.Get<uint64_t>();
    k.spirv.resize(words);
    std::memcpy(k.spirv.data(), reader.Take(words * 4), words * 4);
    kernels.push_back(std::move(k));
  }
  if (!reader.done()) TVM_FFI_THROW(ValueError) << "Vulkan module: trailing bytes";
  if (!by_key.empty()) TVM_FFI_THROW(ValueError) << "Vulkan module: a kernel without SPIR-V";
  auto node = ffi::make_object<VulkanModuleNode>(bytes, std::move(kernels));
  node->Prepare();  // pipeline errors surface at load time, not mid-run
  return ffi::Module(node);
}

// "name\tapi version\tdevice count" of device 0, or "error\t<why>".
ffi::String Info() {
  Instance& instance = Instance::Get();
  if (!instance.ok() || instance.physical().empty())
    return ffi::String("error\t" + instance.error());
  VkPhysicalDeviceProperties props;
  vkGetPhysicalDeviceProperties(instance.physical()[0], &props);
  std::ostringstream os;
  os << props.deviceName << "\t" << VK_API_VERSION_MAJOR(props.apiVersion) << "."
     << VK_API_VERSION_MINOR(props.apiVersion) << "." << VK_API_VERSION_PATCH(props.apiVersion)
     << "\t" << instance.physical().size();
  return ffi::String(os.str());
}

// Registered with override: a loader placeholder registered earlier in the process (fmc's
// tests once did that) must not make loading this library abort.
TVM_FFI_STATIC_INIT_BLOCK() {
  ffi::Function::SetGlobal("device_api.vulkan", ffi::Function::FromPacked([](PackedArgs, Any* rv) {
                             *rv = static_cast<void*>(VulkanDeviceAPI::Global());
                           }),
                           true);
  ffi::Function::SetGlobal("ffi.Module.load_from_bytes.vulkan",
                           ffi::Function::FromTyped(LoadFromBytes), true);
  ffi::Function::SetGlobal("fmc.vulkan.info", ffi::Function::FromTyped(Info), true);
}

}  // namespace fmc_vulkan
